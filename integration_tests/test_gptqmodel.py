"""A GPTQ export loads in GPTQModel (its CPU torch kernel) with logits matching ours.

GPTQModel runs in whatever Python has it: this one, or the interpreter named by GPTQMODEL_PYTHON
(CI installs it into a separate virtual environment: `.ci/run`). Skipped, with the reason, when
neither has it.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig
from hf_astroquant.export.gptq import export_gptq
from tiny import calib_ids, save_tiny, tiny_tokenizer

LOAD = r"""
import os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.6 asks for 2 loader workers even on 2 cores
import torch
from gptqmodel import BACKEND, GPTQModel
from gptqmodel.nn_modules.qlinear import BaseQuantLinear
path, ids_path, out_path = sys.argv[1:4]
model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
hf = model.model
kernels = sorted({type(m).__name__ for m in hf.modules() if isinstance(m, BaseQuantLinear)})
with torch.inference_mode():
    logits = hf(input_ids=torch.load(ids_path)).logits.float()
torch.save({"logits": logits, "kernels": kernels}, out_path)
"""


def _gptqmodel_python() -> str:
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    exe = os.environ.get("GPTQMODEL_PYTHON")
    if exe and os.path.exists(exe):
        return exe
    pytest.skip("GPTQModel is not installed here (pip install gptqmodel, or set GPTQMODEL_PYTHON to a Python "
                "that has it; .ci/run does)")


@pytest.mark.parametrize("kw,fmt", [
    (dict(bits=4, group_size=32, sym=True), "gptq"),
    (dict(bits=4, group_size=32, sym=True, desc_act=True), "gptq"),
    (dict(bits=3, group_size=32, sym=True), "gptq"),
    # GPTQModel refuses sym=False in v1 unless GPTQModel wrote it; v2 carries asymmetric grids to it
    (dict(bits=4, group_size=32, sym=False, desc_act=True, static_groups=True), "gptq_v2"),
    (dict(bits=2, group_size=64, sym=False), "gptq_v2"),
])
def test_gptq_export_matches_in_gptqmodel(tmp_path, kw, fmt):
    python = _gptqmodel_python()
    save_tiny(tmp_path / "fp", dtype=torch.float16, hidden=128, inter=256)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), dtype=torch.float16,
                                                 quantization_config=AstroQuantConfig(dataset=calib_ids(), **kw))
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")  # GPTQModel.load reads one; the export copies it
    export_gptq(tmp_path / "q", tmp_path / "g", checkpoint_format=fmt)
    ids = calib_ids(2, 32, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([python, "-c", LOAD, str(tmp_path / "g"), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "o.pt")
    hf_astroquant.set_backend(model, "reference")
    with torch.no_grad():
        ours = model(ids).logits.float()
    # Both run fp16 matmuls (in different orders), so the elementwise difference is fp16 noise: the
    # relative error is measured as ‖Δ‖/‖logits‖ over the whole output, the max-abs version printed too.
    diff = theirs["logits"] - ours
    rel = float(diff.norm() / ours.norm())
    rel_max = float(diff.abs().max() / ours.abs().max())
    print(f"{kw} {fmt}: GPTQModel kernels {theirs['kernels']}, relative logit error {rel:.2e} (max-abs {rel_max:.2e})")
    assert theirs["kernels"] and rel < 1e-3 and rel_max < 5e-3
    # The difference is rounding, not format: against the same codes evaluated in fp32, GPTQModel's fp16
    # logits are about as close as our own fp16 logits are.
    exact = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32,
                                                 quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        truth = exact(ids).logits
    ours_err = float((ours - truth).norm() / truth.norm())
    theirs_err = float((theirs["logits"] - truth).norm() / truth.norm())
    print(f"   vs fp32 evaluation of the same codes: ours (fp16) {ours_err:.2e}, GPTQModel (fp16) {theirs_err:.2e}")
    assert theirs_err < 2 * ours_err + 1e-4
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == fmt
