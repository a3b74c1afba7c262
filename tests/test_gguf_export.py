"""export_gguf and `hf-astroquant export --format gguf`: a checkpoint solved onto GGUF grids becomes a
GGUF file whose blocks are the checkpoint's, byte for byte, and which llama.cpp runs to our logits.

Families: SmolLM2-style Llama (q/k rows permuted, tied embedding), Qwen 3 (128-wide rows: the
32-column fallback types) and Gemma 3 ((1 + w) norms, sliding layers), built and quantized here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader

from hf_astroquant.gguf.export import export_gguf, round_to_type
from hf_astroquant.gguf.names import unpermute_rows
from hf_astroquant.export.source import ExportError
from test_gguf_writer import (EXACT_ACTIVATION_TYPES, EXPECTED, TEXTS, build_family, check_against_rounded_activations, hf_logits,
                              llamacpp_activations, run_llamacpp)

FAMILY_TYPES = {"smollm": "Q4_K_M", "qwen3": "Q3_K_M", "gemma3_text": "Q4_0"}


def quantize_family(name: str, file_type: str, root: Path):
    """(quantized model, tokenizer, its saved directory)."""
    from transformers import AutoModelForCausalLM

    from hf_astroquant import AstroQuantConfig

    _, tok = build_family(name, root / "fp")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (8, 32), generator=g)
    q = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=AstroQuantConfig(
        gguf_type=file_type, dataset=ids), dtype=torch.float32)
    q.save_pretrained(root / "q")
    tok.save_pretrained(root / "q")
    return q, tok, root / "q"


@pytest.fixture(scope="module", params=list(FAMILY_TYPES))
def exported(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"gguf-{name}")
    model, tok, qdir = quantize_family(name, FAMILY_TYPES[name], root)
    summary = export_gguf(qdir, root / "model.gguf")
    return name, model, tok, qdir, summary


def _file_tensors(path: str) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def test_blocks_are_copied_exactly_and_decode_to_our_weights(exported):
    from hf_astroquant.modules import GGUFLinear

    name, model, _, _, summary = exported
    stored = _file_tensors(summary["path"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[summary["arch"].upper()], model.config.num_hidden_layers)
    permuted = EXPECTED[name][3]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(layers) == 7 * model.config.num_hidden_layers
    for module, layer in layers.items():
        t = stored[names.get_name(module + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == layer.tensor_type
        raw = np.array(t.data).reshape(layer.qblocks.shape)
        if permuted and module.endswith(("q_proj", "k_proj")):
            heads = model.config.num_attention_heads if module.endswith("q_proj") else model.config.num_key_value_heads
            raw = unpermute_rows(raw, heads)
        assert np.array_equal(raw, layer.qblocks.numpy()), module
        decoded = gguf.quants.dequantize(raw, t.tensor_type)
        assert torch.equal(torch.from_numpy(decoded), layer.dequantize_weight()), module
    assert summary["gguf_type"] == FAMILY_TYPES[name]
    assert GGUFReader(summary["path"]).fields["general.file_type"].contents() == \
        {"Q4_K_M": 15, "Q3_K_M": 12, "Q4_0": 2}[FAMILY_TYPES[name]]


def test_full_precision_matrices_follow_llamacpp_recipe(exported):
    """Token embedding / output: Q6_K, or Q8_0 where a row is not a multiple of 256 (all three
    families here have 128- or 256-wide rows); norms F32."""
    name, model, _, _, summary = exported
    stored = _file_tensors(summary["path"])
    cols = model.config.hidden_size
    expected = "Q8_0" if cols % 256 else "Q6_K"
    if model.config.tie_word_embeddings:
        assert "output.weight" not in stored
        assert stored["token_embd.weight"].tensor_type.name == expected
    else:
        assert stored["output.weight"].tensor_type.name == expected
    assert all(t.tensor_type.name == "F32" for n, t in stored.items() if n.endswith("norm.weight"))


def test_round_to_type_is_our_grid_rounding():
    from hf_astroquant.gguf.grid import dequantize, fit_gguf_grid, quantize_codes

    W = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    for t in ("Q6_K", "Q8_0", "Q4_K"):
        grid = fit_gguf_grid(W, t)
        ours = dequantize(quantize_codes(W, grid), grid)
        decoded = gguf.quants.dequantize(round_to_type(W, t), gguf.GGMLQuantizationType[t])
        assert torch.equal(torch.from_numpy(decoded), ours.float()), t


def file_types_of_modules(model, stored: dict, arch: str) -> dict[str, str]:
    """module name → the tensor type its weight has in the file (lm_head: output or tied token_embd)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    types = {}
    for module, m in model.named_modules():
        if hasattr(m, "in_features"):
            g = names.get_name(module + ".weight", try_suffixes=(".weight",))
            g = g if g in stored else "token_embd.weight"
            types[module] = stored[g].tensor_type.name
    return types


def test_llamacpp_runs_the_file_to_our_logits(exported, tmp_path):
    """llama.cpp's logits against the same model in PyTorch: its embedding / output replaced by what
    the file holds (the only matrices the export rounds) and each Linear's input rounded to 8 bits
    as llama.cpp's quantized matmul rounds it (Q8_0 or Q8_K blocks); see check_against_rounded_activations."""
    name, model, tok, _, summary = exported
    stored = _file_tensors(summary["path"])
    with torch.no_grad():
        for key, param in (("token_embd.weight", model.get_input_embeddings().weight),
                           ("output.weight", model.get_output_embeddings().weight)):
            if key in stored:
                t = stored[key]
                param.copy_(torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type))
                            .reshape(param.shape))
    ids = tok(TEXTS[0], add_special_tokens=True)["input_ids"][:24]
    logits, tokens = run_llamacpp(Path(summary["path"]), [ids], TEXTS[:1], tmp_path)
    types = file_types_of_modules(model, stored, summary["arch"])
    with llamacpp_activations(model, types):
        ours = hf_logits(model, ids)
    exact = set(types.values()) <= EXACT_ACTIVATION_TYPES and not name.startswith("gemma")
    assert exact is (name == "smollm")  # qwen3's 128-wide rows fall back to Q5_0
    check_against_rounded_activations(f"{name} {FAMILY_TYPES[name]}", logits[0][:, : model.config.vocab_size], ours,
                                      exact)
    assert tokens[0] == tok(TEXTS[0], add_special_tokens=True)["input_ids"]


# --------------------------------------------------------------------------- what is refused

@pytest.fixture(scope="module")
def integer_grid_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from hf_astroquant import AstroQuantConfig

    root = tmp_path_factory.mktemp("int-grid")
    _, tok = build_family("smollm", root / "fp")
    q = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=AstroQuantConfig(
        bits=4, group_size=64, method="rtn"))
    q.save_pretrained(root / "q")
    return root


def test_integer_grid_checkpoint_is_refused(integer_grid_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="integer grids.*gguf_type"):
        export_gguf(integer_grid_checkpoint / "q", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())


def test_full_precision_export_and_its_refusals(integer_grid_checkpoint, tmp_path):
    fp = integer_grid_checkpoint / "fp"
    summary = export_gguf(fp, tmp_path / "f16.gguf")
    assert summary["gguf_type"] == "F16" and summary["tensor_types"]["F16"] > 0
    assert GGUFReader(summary["path"]).fields["general.file_type"].contents() == 1
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(fp, tmp_path / "f16.gguf")
    assert export_gguf(fp, tmp_path / "f16.gguf", "F32", overwrite=True)["tensor_types"].keys() == {"F32"}
    with pytest.raises(ExportError, match="full-precision model.*--gguf-type Q4_K_M"):
        export_gguf(fp, tmp_path / "q.gguf", "Q4_K_M")
    with pytest.raises(ValueError, match="'Q4_K_X' is not valid; allowed: F32, F16, Q4_0"):
        export_gguf(fp, tmp_path / "q.gguf", "Q4_K_X")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path / "empty", tmp_path / "q.gguf")
    with pytest.raises(ValueError, match="lies inside the checkpoint read"):
        export_gguf(tmp_path / "empty", tmp_path / "empty" / "q.gguf")


def test_a_different_type_than_the_checkpoint_is_refused(exported, tmp_path):
    name, _, _, qdir, _ = exported
    other = "Q8_0" if FAMILY_TYPES[name] != "Q8_0" else "Q4_0"
    with pytest.raises(ExportError, match=f"solved onto '{FAMILY_TYPES[name]}'"):
        export_gguf(qdir, tmp_path / "x.gguf", other)
    assert export_gguf(qdir, tmp_path / "same.gguf", FAMILY_TYPES[name])["tensors"] > 0


# --------------------------------------------------------------------------- the CLI

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_astroquant", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cli_export_gguf(integer_grid_checkpoint, tmp_path):
    fp = integer_grid_checkpoint / "fp"
    r = _cli("export", fp, "--format", "gguf", "--gguf-type", "F32", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    assert "gguf (F32)" in r.stdout and "llama" in r.stdout and (tmp_path / "m.gguf").is_file()
    r = _cli("export", fp, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.returncode != 0 and "--overwrite" in r.stderr
    r = _cli("export", integer_grid_checkpoint / "q", "--format", "gguf", "--out", tmp_path / "n.gguf")
    assert r.returncode != 0 and "integer grids" in r.stderr and "Traceback" not in r.stderr
    r = _cli("export", fp, "--format", "gptq", "--gguf-type", "F16", "--out", tmp_path / "g")
    assert r.returncode != 0 and "--gguf-type" in r.stderr and "--format gguf" in r.stderr


# --------------------------------------------------------------------------- every file type

@pytest.fixture(scope="module")
def smollm_style(tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    model, tok = build_family("smollm", root / "fp")
    return root, tok


@pytest.mark.parametrize("file_type", list(__import__("hf_astroquant.gguf.types",
                                                      fromlist=["FILE_TYPES"]).FILE_TYPES))
def test_every_file_type_decodes_exactly_and_llamacpp_perplexity_is_ours(smollm_style, file_type, tmp_path):
    """For each of the 14 file types (round-to-nearest, so that all run in seconds): every Linear of
    the file decodes (gguf-py) to exactly our layer's weight, and llama.cpp's perplexity of the file
    is our PyTorch perplexity of the same weights within 0.5 % (F32 KV cache; embedding from the file)."""
    from transformers import AutoModelForCausalLM

    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.modules import GGUFLinear
    from engines.vllm_harness import our_nll, perplexity_of

    root, tok = smollm_style
    model = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=AstroQuantConfig(
        gguf_type=file_type, method="rtn"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    summary = export_gguf(tmp_path / "q", tmp_path / "m.gguf")
    stored = _file_tensors(summary["path"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for module, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, GGUFLinear)):
        t = stored[names.get_name(module + ".weight", try_suffixes=(".weight",))]
        decoded = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(layer.out_features, -1)
        if module.endswith(("q_proj", "k_proj")):
            heads = model.config.num_attention_heads if module.endswith("q_proj") else model.config.num_key_value_heads
            decoded = unpermute_rows(decoded, heads)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(decoded)), layer.dequantize_weight()), module
    t = stored["token_embd.weight"]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(emb.shape))
    windows = torch.randint(3, len(tok), (2, 48), generator=torch.Generator().manual_seed(5))
    ours = perplexity_of(*our_nll(model, windows))
    from engines import llamacpp_harness

    if llamacpp_harness.unavailable_reason():
        pytest.skip(llamacpp_harness.unavailable_reason())
    theirs = llamacpp_harness.perplexity(summary["path"], windows, f32_kv_cache=True)["perplexity"]
    print(f"{file_type}: perplexity ours {ours:.4f}, llama.cpp {theirs:.4f}")
    assert abs(theirs / ours - 1) < 0.005
