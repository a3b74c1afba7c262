"""Unquantized tensors are saved in the source checkpoint's dtype (or `unquantized_dtype`), and a reload
computes exactly what the quantized model did in memory."""

import glob
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401
from hf_astroquant import AstroQuantConfig
from hf_astroquant.unquantized_dtype import source_dtype
from tiny import calib_ids, save_tiny

PACKED = ("qweight", "qzeros", "scales", "g_idx", "qblocks", "rotation")


def _cfg(**kw):
    return AstroQuantConfig(bits=4, group_size=32, backend="reference", dataset=calib_ids(), **kw)


def _dtypes(path) -> dict[str, torch.dtype]:
    out = {}
    for f in glob.glob(f"{path}/*.safetensors"):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def _unquantized(dtypes: dict) -> dict:
    return {k: v for k, v in dtypes.items() if k.rpartition(".")[2] not in PACKED and not k.endswith("proj.weight")}


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    save_tiny(path, layers=2, dtype=torch.bfloat16)
    return str(path)


@pytest.mark.parametrize("transform", ["none", "rotate"])
def test_a_bf16_source_is_saved_in_bf16_and_reloads_to_the_same_logits(bf16_source, tmp_path, transform):
    ids = calib_ids(2, 16, seed=4)
    model = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.float32,
                                                 quantization_config=_cfg(transform=transform))
    assert model.model.embed_tokens.weight.dtype == torch.float32  # calibration's dtype stays in memory
    emb = model.model.embed_tokens.weight
    assert torch.equal(emb, emb.to(torch.bfloat16).float())  # ... holding values bf16 holds exactly
    model.save_pretrained(tmp_path / "q")
    saved = _unquantized(_dtypes(tmp_path / "q"))
    assert saved and set(saved.values()) == {"BF16"}, saved
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["unquantized_dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32,
                                                quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    back.save_pretrained(tmp_path / "again")  # a re-save keeps the dtype and the bits
    for f in glob.glob(f"{tmp_path}/q/*.safetensors"):
        name = f.rpartition("/")[2]
        with safe_open(f, "pt") as a, safe_open(f"{tmp_path}/again/{name}", "pt") as b:
            for k in a.keys():
                if k in b.keys():
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_the_rotation_changes_the_embedding_so_rounding_is_real(bf16_source):
    # with the residual rotation folded in, the fp32 embedding is not bf16-exact before the rounding:
    # the in-memory rounding above is what makes the reload exact
    from hf_astroquant.unquantized_dtype import round_in_memory
    from hf_astroquant.modules import QUANTIZED_LAYERS

    model = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.float32,
                                                 quantization_config=_cfg(transform="rotate", unquantized_dtype="float32"))
    emb = model.model.embed_tokens.weight.detach().clone()
    assert not torch.equal(emb, emb.to(torch.bfloat16).float())
    changed = round_in_memory(model, QUANTIZED_LAYERS, torch.bfloat16)
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed


def test_float32_keeps_a_bf16_source_wide_in_the_file(bf16_source, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.float32,
                                                 quantization_config=_cfg(transform="rotate", unquantized_dtype="float32"))
    model.save_pretrained(tmp_path / "q")
    assert set(_unquantized(_dtypes(tmp_path / "q")).values()) == {"F32"}


@pytest.mark.parametrize("option,stored", [(None, "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_an_fp32_source_keeps_fp32_unless_asked(tmp_path, option, stored):
    save_tiny(tmp_path / "fp32", layers=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=_cfg(unquantized_dtype=option))
    model.save_pretrained(tmp_path / "q")
    assert set(_unquantized(_dtypes(tmp_path / "q")).values()) == {stored}
    ids = calib_ids(2, 16, seed=4)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_bf16_model_quantized_in_bf16_is_left_as_it_is(bf16_source, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.bfloat16,
                                                 quantization_config=_cfg(unquantized_dtype="float32"))
    model.save_pretrained(tmp_path / "q")  # float32 is never a widening of the bf16 tensors
    assert set(_unquantized(_dtypes(tmp_path / "q")).values()) == {"BF16"}


def test_float16_refuses_a_value_beyond_its_range_by_name(tmp_path):
    model = save_tiny(tmp_path / "fp32", layers=2)
    with torch.no_grad():
        model.model.norm.weight[3] = 1e6
    model.save_pretrained(tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"unquantized_dtype='float16': model\.norm\.weight holds values up to 1e\+06"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=_cfg(unquantized_dtype="float16"))


@pytest.mark.parametrize("bad", ["fp16", "float64", 16, torch.bfloat16])
def test_bad_values_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="unquantized_dtype"):
        _cfg(unquantized_dtype=bad)


def test_offloaded_unquantized_tensors_are_rounded_where_they_live(tmp_path):
    ids = calib_ids(2, 16, seed=4)
    source = save_tiny(tmp_path / "fp32", layers=2)
    placement = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk",
                 "model.layers.0": "cpu", "model.layers.1": "disk"}
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=_cfg(unquantized_dtype="bfloat16"))
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", device_map=placement, offload_folder=str(tmp_path / "o"),
                                               quantization_config=_cfg(unquantized_dtype="bfloat16"))
    assert not torch.equal(full.lm_head.weight, source.lm_head.weight)  # the rounding did change values
    off.save_pretrained(tmp_path / "q")
    assert set(_unquantized(_dtypes(tmp_path / "q")).values()) == {"BF16"}
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=AstroQuantConfig(backend="reference"))
    with torch.no_grad():
        expected = full(ids).logits
        assert torch.equal(off(ids).logits, expected) and torch.equal(back(ids).logits, expected)


def test_source_dtype_is_the_dtype_holding_most_elements():
    headers = {"a": ((1000, 64), "BF16"), "b": ((64,), "F32"), "c": ((3,), "I64")}
    assert source_dtype(headers) is torch.bfloat16
    assert source_dtype({"c": ((3,), "I64")}) is None and source_dtype({}) is None


def test_tied_embeddings_are_cast_once_and_stored_once(tmp_path):
    """A tied embedding is one tensor in the file after the cast too (a file twice the embedding's size
    otherwise), and the reload still ties it and computes what the model did."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)).save_pretrained(
        tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_cfg(unquantized_dtype="bfloat16"))
    model.save_pretrained(tmp_path / "q")
    saved = _dtypes(tmp_path / "q")
    assert saved["model.embed_tokens.weight"] == "BF16" and "lm_head.weight" not in saved
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=AstroQuantConfig(backend="reference"))
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = calib_ids(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
