"""Quantize a tiny Llama inside from_pretrained, save, reload in a fresh process, generate."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig, QuantLinear
from tiny import calib_ids, save_tiny

RELOAD = r"""
import sys, torch
import hf_astroquant
from transformers import AutoModelForCausalLM
path, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path)
assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids[:1, :8], max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "generated": gen, "dtype": str(model.model.layers[0].mlp.up_proj.scales.dtype)}, out_path)
"""


def _fresh_process_reload(path, ids, tmp_path):
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(ids_path), str(out_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_path)


@pytest.mark.parametrize("dtype,kw", [
    (torch.float32, dict(bits=4, group_size=32)),
    (torch.float32, dict(bits=3, group_size=48, desc_act=True)),
    (torch.float32, dict(bits=2, group_size=-1, sym=True)),
    (torch.float32, dict(bits=8, group_size=16, desc_act=True, static_groups=True)),
    (torch.bfloat16, dict(bits=4, group_size=32)),
    (torch.float16, dict(bits=4, group_size=32, desc_act=True)),
])
def test_quantize_save_reload_in_fresh_process_gives_identical_logits(tmp_path, dtype, kw):
    src, out = tmp_path / "fp", tmp_path / "q"
    save_tiny(src, dtype=dtype, bias=kw["bits"] == 8)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), dtype=dtype, quantization_config=AstroQuantConfig(dataset=calib_ids(), **kw))
    model.save_pretrained(out)
    ids = calib_ids(3, 24, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids[:1, :8], max_new_tokens=12, do_sample=False)
    got = _fresh_process_reload(out, ids, tmp_path)
    assert torch.equal(got["logits"], logits)
    assert torch.equal(got["generated"], gen) and gen.shape[1] == 20
    assert got["dtype"] == "torch.float16"

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "astroquant" and cfg["bits"] == kw["bits"]
    assert "dataset" not in cfg and len(cfg["quantized_modules"]) == 14
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.qweight").dtype == torch.int32
    assert "model.layers.0.mlp.up_proj.weight" not in keys
    assert {"model.layers.1.self_attn.o_proj." + t for t in ("qweight", "qzeros", "scales", "g_idx")} <= keys


def test_four_bit_checkpoint_is_under_0_3x_the_fp16_linear_bytes(tmp_path):
    src, out = tmp_path / "fp", tmp_path / "q"
    save_tiny(src, hidden=256, inter=512, layers=2)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=AstroQuantConfig(bits=4, group_size=64, dataset=calib_ids(8, 32)))
    model.save_pretrained(out)
    packed = fp16 = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                t = f.get_tensor(key)
                packed += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            fp16 += m.in_features * m.out_features * 2
    assert packed / fp16 < 0.3, packed / fp16


def test_reload_ignores_a_conflicting_user_config_and_keeps_the_checkpoints(tmp_path):
    src, out = tmp_path / "fp", tmp_path / "q"
    save_tiny(src)
    AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids())).save_pretrained(out)
    with pytest.warns(UserWarning):
        model = AutoModelForCausalLM.from_pretrained(str(out), quantization_config=AstroQuantConfig(bits=2))
    assert model.model.layers[0].mlp.up_proj.bits == 4
