"""compressed-tensors export: the file holds exactly our weights, as three readers rebuild them.

1. A slow reference written from the format's definition (bit by bit, element by element).
2. compressed-tensors' own decompression (`PackedQuantizationCompressor.decompress`), when installed.
3. transformers' compressed-tensors loader (`from_pretrained` of the exported directory): logits.
vLLM, the engine this format is for, is checked in integration_tests/test_vllm.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_astroquant
from hf_astroquant import AstroQuantConfig
from hf_astroquant.export.compressed_tensors import (convert_layer, decode, export_compressed_tensors,
                                                     pack_last_dim, unpack_last_dim)
from hf_astroquant.export.gptq import ExportError
from hf_astroquant.modules.packing import pack_cols, pack_rows
from tiny import calib_ids, save_tiny, set_quantization_options

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def reference_unpack(word_row: torch.Tensor, bits: int, n: int) -> list[int]:
    """n codes from one row of int32 words: code j is bits [(j mod p)·b, (j mod p + 1)·b) of word j // p."""
    p = 32 // bits
    out = []
    for j in range(n):
        word = int(word_row[j // p]) & 0xFFFFFFFF
        out.append(sum(((word >> ((j % p) * bits + t)) & 1) << t for t in range(bits)))
    return out


def reference_weight(t: dict, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    """W[o, i] = scale[o, g] · ((u − 2^(b−1)) − (z − 2^(b−1))), g = g_idx[i] or i // group_size."""
    out_f, in_f = (int(x) for x in t["weight_shape"])
    off = 2 ** (bits - 1)
    zp_cols = None
    if not symmetric:
        zp_t = t["weight_zero_point"].t()  # (groups, ⌈out/p⌉): packed along out
        zp_cols = [reference_unpack(zp_t[g], bits, out_f) for g in range(zp_t.shape[0])]
    W = torch.empty(out_f, in_f)
    for o in range(out_f):
        q = reference_unpack(t["weight_packed"][o], bits, in_f)
        for i in range(in_f):
            g = int(t["weight_g_idx"][i]) if "weight_g_idx" in t else i // (in_f if group_size == -1 else group_size)
            zp = 0 if symmetric else zp_cols[g][o] - off
            W[o, i] = float(t["weight_scale"][o, g]) * ((q[i] - off) - zp)
    return W


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 100])
def test_packing_matches_the_definition_and_inverts(bits, n):
    torch.manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (3, n))
    packed = pack_last_dim(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-n // (32 // bits)))
    assert [reference_unpack(packed[r], bits, n) for r in range(3)] == codes.tolist()
    assert torch.equal(unpack_last_dim(packed, bits, n), codes.to(torch.int32))


def test_packing_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="bits=9 cannot be packed by compressed-tensors; allowed: 1 to 8"):
        pack_last_dim(torch.zeros(1, 4, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"codes outside \[0, 15\]"):
        pack_last_dim(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("bits,sym,group_size,g_idx", [
    (4, False, 16, False), (3, False, 8, True), (2, True, -1, False), (8, False, 32, False), (4, True, 16, True)])
def test_one_layer_converts_to_exactly_our_weight(bits, sym, group_size, g_idx):
    torch.manual_seed(bits)
    out_f, in_f = 40, 32
    groups = 1 if group_size == -1 else in_f // group_size
    u = torch.randint(0, 2**bits, (in_f, out_f))
    z = torch.full((groups, out_f), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (groups, out_f))
    s = (torch.rand(groups, out_f) + 0.1).half().float()
    gi = (torch.randperm(in_f) % groups if g_idx else torch.arange(in_f) // (in_f // groups)).to(torch.int32)
    ours = (u.t() - z[gi.long()].t()).float() * s[gi.long()].t()  # W[o, i] = s (u − z) of column i's group
    t = convert_layer(pack_rows(u, bits), pack_cols(z, bits), s, gi, bits, sym, torch.float16, store_g_idx=g_idx)
    assert ("weight_zero_point" in t) is (not sym) and ("weight_g_idx" in t) is g_idx
    assert torch.equal(reference_weight(t, bits, sym, group_size), ours)
    assert torch.equal(decode(t, bits, sym, group_size), ours)


def _quantized(tmp_path, dtype=torch.float16, layers=1, **kw):
    src, out = tmp_path / "fp", tmp_path / "q"
    save_tiny(src, dtype=dtype, layers=layers, hidden=64, inter=128, bias=kw.pop("bias", False))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype,
                                                 quantization_config=AstroQuantConfig(dataset=calib_ids(8, 16), **kw))
    model.save_pretrained(out)
    return model, out


def _ours(model, name):
    layer = model.get_submodule(name)
    return layer.dequantize_weight(torch.float32)


CASES = [
    (dict(bits=4, group_size=32), "weight"),  # the defaults: act-order with static groups
    (dict(bits=4, group_size=32, desc_act=False), None),
    (dict(bits=3, group_size=16, static_groups=False), "group"),  # act-order's own groups need g_idx
    (dict(bits=2, group_size=-1, sym=True, desc_act=False), None),
    (dict(bits=8, group_size=64, bias=True), "weight"),
]


@pytest.mark.parametrize("kw,actorder", CASES)
def test_export_holds_exactly_our_weights(tmp_path, kw, actorder):
    model, saved = _quantized(tmp_path, **kw)
    summary = export_compressed_tensors(saved, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert (w["num_bits"], w["symmetric"], w["actorder"]) == (kw["bits"], kw.get("sym", False), actorder)
    assert w["strategy"] == ("channel" if kw["group_size"] == -1 else "group")
    assert q["ignore"] == ["lm_head"] and summary.layers == 7 and summary.actorder == actorder
    assert summary.largest_scale_rounding == 0.0  # our scales are fp16 values: written exactly
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in tensors)
    group = -1 if kw["group_size"] == -1 else kw["group_size"]
    for name in (f"model.layers.0.{leaf}" for leaf in LAYERS):
        parts = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        assert f"{name}.weight" not in tensors
        ours = _ours(model, name)
        assert torch.equal(decode(parts, kw["bits"], kw.get("sym", False), group), ours), name
        if name.endswith("k_proj"):  # the slow reference on one layer per case
            assert torch.equal(reference_weight(parts, kw["bits"], kw.get("sym", False), group), ours)
        if kw.get("bias"):
            assert tensors[f"{name}.bias"].dtype == torch.float16


@pytest.mark.parametrize("kw,actorder", CASES)
def test_compressed_tensors_own_decompression_rebuilds_our_weights(tmp_path, kw, actorder):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (in the test extra)")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, saved = _quantized(tmp_path, **kw)
    export_compressed_tensors(saved, tmp_path / "ct")
    q = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    scheme = q.config_groups["group_0"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name in (f"model.layers.0.{leaf}" for leaf in LAYERS):
        local = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        local.pop("bias", None)
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        # it computes (q - zp) * scale in the scales' dtype (fp16): our exact fp32 weight, rounded once
        assert weight.dtype == torch.float16 and torch.equal(weight, _ours(model, name).half()), name


@pytest.mark.parametrize("kw", [CASES[0][0], CASES[3][0]])
def test_transformers_loads_the_export_with_our_logits(tmp_path, kw):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (in the test extra)")
    model, saved = _quantized(tmp_path, layers=2, **kw)
    export_compressed_tensors(saved, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float16)
    assert not any(isinstance(m, hf_astroquant.QuantLinear) for m in theirs.modules())
    ids = calib_ids(2, 16, seed=7)
    hf_astroquant.set_backend(model, "reference")  # de-quantize, then the same fp16 matmul
    with torch.no_grad():
        ours, got = model(ids).logits.float(), theirs(ids).logits.float()
    assert (got - ours).abs().max() / ours.abs().max() < 1e-3


def test_unquantized_linears_go_to_ignore(tmp_path):
    model, saved = _quantized(tmp_path, bits=4, group_size=32, modules_to_not_convert=["mlp.down_proj"])
    export_compressed_tensors(saved, tmp_path / "ct")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["ignore"] == ["model.layers.0.mlp.down_proj", "lm_head"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16


def test_bfloat16_export_reports_its_scale_rounding(tmp_path):
    _, saved = _quantized(tmp_path, bits=4, group_size=32)
    summary = export_compressed_tensors(saved, tmp_path / "ct", dtype=torch.bfloat16)
    assert 0 < summary.largest_scale_rounding < 2**-8  # bf16 keeps 8 significant bits
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "bfloat16"


def test_refusals(tmp_path):
    _, saved = _quantized(tmp_path, bits=4, group_size=48)  # 64 and 128 inputs: ragged last group
    with pytest.raises(ExportError, match="group_size=48 does not divide the input width.*whole groups"):
        export_compressed_tensors(saved, tmp_path / "x")
    set_quantization_options(saved, online_hadamard=True)
    with pytest.raises(ExportError, match=r"\['online_hadamard'\] are not known to the compressed-tensors export"):
        export_compressed_tensors(saved, tmp_path / "x")
    save_tiny(tmp_path / "plain", layers=1, hidden=32, inter=64)
    with pytest.raises(ExportError, match="not an hf_astroquant checkpoint"):
        export_compressed_tensors(tmp_path / "plain", tmp_path / "y")
    with pytest.raises(ValueError, match="dtype=torch.float32 is not valid; allowed: torch.float16, torch.bfloat16"):
        export_compressed_tensors(saved, tmp_path / "z", dtype=torch.float32)
    with pytest.raises(ValueError, match="the export directory .* is the checkpoint read itself"):
        export_compressed_tensors(saved, saved)
    with pytest.raises(ValueError, match="the export directory .* lies inside the checkpoint read"):
        export_compressed_tensors(saved, saved / "sub")
    with pytest.raises(ValueError, match="the export directory .* holds the checkpoint read"):
        export_compressed_tensors(saved, saved.parent)


def test_sharded_checkpoint_keeps_its_index(tmp_path):
    src = tmp_path / "fp"
    save_tiny(src, layers=2, hidden=32, inter=64)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=AstroQuantConfig(
        bits=4, group_size=16, dataset=calib_ids(8, 16)))
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    files = {p.name for p in (tmp_path / "ct").glob("*.safetensors")}
    assert set(index["weight_map"].values()) == files
    stored = {k for f in files for k in load_file(str(tmp_path / "ct" / f))}
    assert stored == set(index["weight_map"]) and "model.layers.1.mlp.up_proj.weight_packed" in stored


@pytest.mark.parametrize("fmt,bits,sym,reordered,expected", [
    ("compressed-tensors", 4, False, False, []),
    ("compressed-tensors", 4, True, False, []),
    ("compressed-tensors", 4, False, True, ["actorder 'group'"]),
    ("compressed-tensors", 3, False, False, ["CPU kernel serves 4 bits only"]),
    ("gptq", 4, True, False, []),
    ("gptq", 4, False, False, ["asymmetric GPTQ"]),
    ("gptq", 4, True, True, ["desc_act=True"]),
    ("gptq", 2, True, False, ["4 or 8 bits, not 2", "CPU kernel serves 4 bits only"]),
])
def test_vllm_notes_name_what_vllm_refuses(fmt, bits, sym, reordered, expected):
    from hf_astroquant.export.engines import vllm_notes

    notes = vllm_notes(fmt, bits, sym, reordered)
    assert len(notes) == len(expected) and all(e in n for e, n in zip(expected, notes)), notes
