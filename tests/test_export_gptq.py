"""GPTQ export: a slow reference decoder of the GPTQ v1/v2 format, written from the format's
definition (not from our packing code), rebuilds the fp model; its logits must match ours."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig
from hf_astroquant.export.gptq import ExportError, export_gptq
from tiny import calib_ids, save_tiny, set_quantization_options


def _bit(words: torch.Tensor, k: int) -> int:
    """Bit k of the little-endian bit stream held in a 1-D int32 tensor."""
    return (int(words[k // 32]) >> (k % 32)) & 1


def _values(words: torch.Tensor, bits: int, n: int) -> list[int]:
    """n unsigned `bits`-bit values from a 1-D stream of int32 words, value j at bits [j*b, (j+1)*b)."""
    return [sum(_bit(words, j * bits + t) << t for t in range(bits)) for j in range(n)]


def reference_gptq_weight(t: dict, bits: int, in_f: int, out_f: int, fmt: str) -> torch.Tensor:
    """W[o, i] = s[g, o] * (q[i, o] - z[g, o]), g = g_idx[i]; v1 stores z - 1 (wrapping mod 2^b)."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].float(), t["g_idx"]
    W = torch.empty(out_f, in_f)
    zeros = [[v + (1 if fmt == "gptq" else 0) for v in _values(qzeros[g], bits, out_f)] for g in range(qzeros.shape[0])]
    for o in range(out_f):
        q = _values(qweight[:, o], bits, in_f)
        for i in range(in_f):
            g = int(g_idx[i])
            W[o, i] = scales[g, o] * (q[i] - zeros[g][o])
    return W


def _quantized_tiny(tmp_path, dtype=torch.float16, **kw):
    src, out = tmp_path / "fp", tmp_path / "q"
    save_tiny(src, dtype=dtype, layers=1, hidden=32, inter=64, bias=kw.pop("bias", False))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype,
                                                 quantization_config=AstroQuantConfig(dataset=calib_ids(8, 16), **kw))
    model.save_pretrained(out)
    return model, out


def _rebuild_from_gptq(export_dir, fmt):
    """An fp32 Llama whose quantized Linears hold the reference-decoded GPTQ weights."""
    config = json.loads((export_dir / "config.json").read_text())
    q = config.pop("quantization_config")
    tensors = load_file(str(export_dir / "model.safetensors"))
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "dtype")}))
    state = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            layer = dict(model.named_modules())[module]
            parts = {n: tensors[f"{module}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
            state[f"{module}.weight"] = reference_gptq_weight(parts, q["bits"], layer.in_features, layer.out_features, fmt)
        elif leaf not in ("qzeros", "scales", "g_idx"):
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("rotary_emb.inv_freq") for k in missing), (missing, unexpected)
    return model.float().eval(), q


@pytest.mark.parametrize("kw,desc_act", [
    (dict(bits=4, group_size=16), False),
    (dict(bits=3, group_size=16, static_groups=False), True),  # act-order's own groups
    (dict(bits=2, group_size=-1, sym=True), False),
    (dict(bits=8, group_size=32, desc_act=True, static_groups=True, bias=True), False),
])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_export_decodes_to_the_same_model(tmp_path, kw, desc_act, fmt):
    model, saved = _quantized_tiny(tmp_path, **kw)
    zeros_ok = fmt == "gptq_v2" or all(int(m.unpack()[1].min()) >= 1 for m in model.modules()
                                       if isinstance(m, hf_astroquant.QuantLinear))
    if not zeros_ok:
        with pytest.raises(ExportError, match="zero point 0"):
            export_gptq(saved, tmp_path / "gptq", checkpoint_format=fmt)
        return
    summary = export_gptq(saved, tmp_path / "gptq", checkpoint_format=fmt)
    assert summary.desc_act is desc_act and summary.layers == 7
    rebuilt, q = _rebuild_from_gptq(tmp_path / "gptq", fmt)
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == fmt and q["desc_act"] is desc_act
    assert q["sym"] is kw.get("sym", False) and q["bits"] == kw["bits"] and q["group_size"] == kw["group_size"]
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text()) == q
    ids = calib_ids(2, 16, seed=7)
    hf_astroquant.set_backend(model, "reference")  # the oracle: de-quantize, then the same fp16 matmul
    with torch.no_grad():
        ours = model(ids).logits.float()
        theirs = rebuilt.to(model.dtype)(ids).logits.float()
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-3
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    assert not any(k.endswith(".weight") and k.rpartition(".")[0] in q.get("modules", []) for k in tensors)
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k.endswith(("qweight", "qzeros", "g_idx")))
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if k.endswith("scales"))


def test_v1_refuses_zero_point_zero_and_v2_keeps_it(tmp_path):
    model, saved = _quantized_tiny(tmp_path, bits=2, group_size=16)
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.mlp.up_proj.qzeros"
    tensors[key] = torch.zeros_like(tensors[key])  # every zero point 0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"up_proj: \d+ group\(s\) have zero point 0.*gptq_v2"):
        export_gptq(saved, tmp_path / "v1")
    export_gptq(saved, tmp_path / "v2", checkpoint_format="gptq_v2")
    assert torch.equal(load_file(str(tmp_path / "v2" / "model.safetensors"))[key], tensors[key])


def test_refuses_group_size_that_does_not_divide(tmp_path):
    _, saved = _quantized_tiny(tmp_path, bits=4, group_size=24)  # 32 and 64 inputs: ragged last group
    with pytest.raises(ExportError, match="group_size=24 does not divide the input width"):
        export_gptq(saved, tmp_path / "x")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_refuses_unquantized_linear_inside_a_block(tmp_path):
    _, saved = _quantized_tiny(tmp_path, bits=4, group_size=16, modules_to_not_convert=["mlp.down_proj"])
    with pytest.raises(ExportError, match=r"left unquantized \(\['model.layers.0.mlp.down_proj'\]"):
        export_gptq(saved, tmp_path / "x")


def test_refuses_unknown_options_and_foreign_checkpoints(tmp_path):
    _, saved = _quantized_tiny(tmp_path, bits=4, group_size=16)
    # a folded transform is plain weights to an engine: exported
    set_quantization_options(saved, transform="rotate", transforms_applied={"transform": "rotate"})
    export_gptq(saved, tmp_path / "folded")
    # an option the export does not know (e.g. an online transform) is refused
    set_quantization_options(saved, online_hadamard=True)
    with pytest.raises(ExportError, match=r"option\(s\) \['online_hadamard'\] are not known to the GPTQ export"):
        export_gptq(saved, tmp_path / "x")
    save_tiny(tmp_path / "plain", layers=1, hidden=32, inter=64)
    with pytest.raises(ExportError, match="not an hf_astroquant checkpoint"):
        export_gptq(tmp_path / "plain", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_gptq(tmp_path / "nowhere", tmp_path / "z")


def test_bad_arguments(tmp_path):
    _, saved = _quantized_tiny(tmp_path, bits=4, group_size=16)
    with pytest.raises(ValueError, match="checkpoint_format='v3' is not valid; allowed: gptq, gptq_v2"):
        export_gptq(saved, tmp_path / "x", checkpoint_format="v3")
    with pytest.raises(ValueError, match="dtype=torch.float32 is not valid"):
        export_gptq(saved, tmp_path / "x", dtype=torch.float32)
    with pytest.raises(ValueError, match="the export directory .* is the checkpoint read itself"):
        export_gptq(saved, saved)
    with pytest.raises(ValueError, match="the export directory .* lies inside the checkpoint read"):
        export_gptq(saved, saved / "sub")
    with pytest.raises(ValueError, match="the export directory .* holds the checkpoint read"):
        export_gptq(saved, saved.parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_gptq(saved, tmp_path / "busy")


def test_sharded_checkpoint_keeps_its_index(tmp_path):
    src = tmp_path / "fp"
    save_tiny(src, layers=2, hidden=32, inter=64)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=AstroQuantConfig(
        bits=4, group_size=16, dataset=calib_ids(8, 16)))
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1
    export_gptq(tmp_path / "q", tmp_path / "g")
    index = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())
    files = {p.name for p in (tmp_path / "g").glob("*.safetensors")}
    assert set(index["weight_map"].values()) == files
    stored = {k for f in files for k in load_file(str(tmp_path / "g" / f))}
    assert stored == set(index["weight_map"])
    assert "model.layers.1.mlp.up_proj.qweight" in stored
