"""GGUF grids (issue 23, part): every type's packed blocks decode in gguf-py to exactly the weights
our solvers chose; llama.cpp's per-tensor mixtures; the gguf_type option end to end."""

import json

import numpy as np
import pytest
import torch

from hf_astroquant.gguf.grid import dequantize, fit_gguf_grid, quantize_codes
from hf_astroquant.gguf.types import TENSOR_TYPES, tensor_type
from hf_astroquant.algorithms.gptq import reconstruction_error
from hf_astroquant.algorithms.rtn import rtn_quantize
from hf_astroquant.algorithms.solve import SolverOptions, solve_linear

pytest.importorskip("gguf")
from hf_astroquant.gguf.blocks import decode, pack  # noqa: E402

TYPES = list(TENSOR_TYPES)


def _weights(rows=8, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g) ** 3
    W[2, :256] = 0  # an all-zero super-block
    return W


def _bitwise_equal(ours: torch.Tensor, theirs: np.ndarray) -> bool:
    return np.array_equal(ours.numpy(), theirs) and ours.shape == theirs.shape


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("search", [False, True])
def test_packed_blocks_decode_to_our_weights_bit_for_bit(name, search):
    W = _weights()
    grid = fit_gguf_grid(W, name, search=search, importance=torch.rand(512, generator=torch.Generator().manual_seed(3)))
    codes = quantize_codes(W, grid)
    blocks = pack(codes, grid)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, TENSOR_TYPES[name].row_bytes(512))
    assert _bitwise_equal(dequantize(codes, grid), decode(blocks, name))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_our_plain_fit_is_llamacpp_reference_and_the_search_is_better(name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 2
    ref = torch.from_numpy(gguf_dequantize(gguf_quantize(W.numpy(), GGMLQuantizationType[name]),
                                           GGMLQuantizationType[name]))
    errs = []
    for search in (False, True):
        g = fit_gguf_grid(W, name, search=search)
        errs.append(float(((dequantize(quantize_codes(W, g), g) - W) ** 2).sum()))
    ref_err = float(((ref - W) ** 2).sum())
    # gguf-py's quantizer is llama.cpp's reference one; for Q8_0 it uses ±127 where we use the -128 level too
    assert errs[0] == pytest.approx(ref_err, rel=1e-3) if name != "Q8_0" else errs[0] < ref_err
    assert errs[1] < ref_err


def _problem(rows=32, cols=512, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.1 + torch.eye(cols))
    X[:, 5] = 0  # a dead input column
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / n


@pytest.mark.parametrize("name", TYPES)
def test_every_solver_lands_on_the_grid_and_gptq_beats_rounding(name):
    W, H = _problem()
    rtn = rtn_quantize(W, bits=4, tensor_type=name, mse=True)
    assert _bitwise_equal(rtn.weight, decode(pack(rtn.codes, rtn.gguf), name))
    errors = {}
    for method, rounding in (("gptq", "gptq"), ("gptq", "beam"), ("gptq", "successive"), ("gptaq", "gptq"),
                             ("rescomp", "gptq")):
        opts = SolverOptions(bits=4, method=method, rounding=rounding, desc_act=True, static_groups=True, mse=True,
                             tensor_type=name, asym_alpha=0.0 if method != "gptq" else None)
        res, _ = solve_linear(W, H, opts)
        assert res.gguf is not None and res.gguf.type == name
        assert _bitwise_equal(res.weight, decode(pack(res.codes, res.gguf), name)), (method, rounding)
        errors[(method, rounding)] = reconstruction_error(W, res.weight, H)
    if name != "Q8_0":  # at 8 bits both errors are ~1e-6 and rounding noise decides
        assert errors[("gptq", "gptq")] < 0.8 * reconstruction_error(W, rtn.weight, H)


def test_llamacpp_mixtures():
    n = 30
    # Q4_K_M: attn_v and ffn_down get Q6_K in llama.cpp's use_more_bits layers, others Q4_K
    more = [i for i in range(n) if tensor_type("Q4_K_M", "ffn_down", i, n, 1536) == "Q6_K"]
    assert more == [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]
    assert tensor_type("Q4_K_M", "attn_q", 0, n, 1536) == "Q4_K"
    assert tensor_type("Q3_K_M", "attn_v", 1, n, 1536) == "Q5_K"
    assert tensor_type("Q3_K_M", "attn_v", 2, n, 1536) == "Q4_K"
    assert tensor_type("Q3_K_M", "attn_output", 5, n, 1536) == "Q4_K"
    assert tensor_type("Q3_K_S", "attn_v", 0, n, 1536) == "Q3_K"
    assert tensor_type("Q2_K", "ffn_down", 5, n, 1536) == "Q3_K"
    assert tensor_type("Q2_K", "attn_v", 5, n, 1536, n_gqa=4) == "Q4_K"
    # rows 256 does not tile fall back as llama.cpp does; 32 not tiling either: left in F16
    assert tensor_type("Q4_K_M", "attn_q", 3, n, 576) == "Q5_0"
    assert tensor_type("Q2_K", "attn_q", 3, n, 576) == "Q4_0"
    assert tensor_type("Q6_K", "attn_q", 3, n, 576) == "Q8_0"
    assert tensor_type("Q4_0", "attn_q", 3, n, 100) == "F16"


def test_gguf_type_end_to_end_save_and_reload(tmp_path):
    from tiny import calib_ids, save_tiny
    from transformers import AutoModelForCausalLM

    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.modules import GGUFLinear

    save_tiny(tmp_path / "fp", hidden=256, inter=512, layers=2)
    ids = calib_ids(n=8, seqlen=32)
    cfg = AstroQuantConfig(gguf_type="Q4_K_M", dataset=ids)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    types = model.config.quantization_config.gguf_tensor_types
    assert set(types.values()) == {"Q4_K", "Q6_K"} and len(types) == 14
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert {n: m.tensor_type for n, m in layers.items()} == types
    logits = model(ids[:1]).logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(again(ids[:1]).logits, logits)
    from hf_astroquant.workflows import export

    for fmt in ("gptq", "compressed-tensors"):  # GGML blocks are not a GPTQ or compressed-tensors layer
        with pytest.raises(ValueError, match="GGUF grids"):
            export(tmp_path / "q", tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("bad", [dict(gguf_type="Q4_K_X"), dict(gguf_type="Q4_K_M", bits=3),
                                 dict(gguf_type="Q4_K_M", group_size=64), dict(gguf_type="Q4_K_M", sym=True),
                                 dict(gguf_type="Q4_K_M", static_groups=False)])
def test_gguf_type_refuses_what_it_cannot_do(bad):
    from hf_astroquant import AstroQuantConfig

    with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "gguf_type"), "gguf_type")):
        AstroQuantConfig(**bad)


def test_a_gguf_layer_refuses_a_kernel_backend():
    from hf_astroquant.modules import GGUFLinear

    layer = GGUFLinear(256, 8, "Q4_K", bias=False)
    with pytest.raises(ValueError, match="int4"):
        layer.set_backend("int4")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_gguf_type_on_other_families(tmp_path, family):
    """Qwen 3 (its own head_dim, q/k norms) and Gemma 3 (sliding and full attention layers, (1+w) norms)."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.modules import GGUFLinear

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=256)
    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=16,
                                                   layer_types=["sliding_attention", "full_attention"]))
    model.eval().save_pretrained(tmp_path / "fp")
    ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(1)).repeat_interleave(4, dim=1)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=AstroQuantConfig(
        gguf_type="Q3_K_M", method="gptaq", dataset=ids))
    layers = [m for m in q.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 14 and {m.tensor_type for m in layers} == {"Q3_K", "Q4_K", "Q5_K"}
    logits = q(ids[:1]).logits
    for m in layers:  # every layer ran, on exactly what its blocks decode to
        assert m._weight is not None and torch.equal(m._weight, m.dequantize_weight())
    q.save_pretrained(tmp_path / "q")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids[:1]).logits, logits)


@pytest.mark.parametrize("quality,bits", [("fast", 4), ("balanced", 2), ("best", 4), ("best", 3), ("best", 2)])
def test_a_preset_for_a_gguf_file_keeps_what_the_file_holds(quality, bits):
    """With gguf_type a preset leaves out what a GGUF file cannot hold (the online rotation) unless the
    caller asks for it, and says so in its record; what GGUF_CHANGED changes is applied and recorded."""
    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.presets import GGUF_CHANGED, GGUF_UNSERVED, PRESETS

    cfg = AstroQuantConfig.recommended(bits, quality, gguf_type="Q4_K_M")
    asked = PRESETS[(quality, bits)][0]
    assert all(getattr(cfg, k) == v for k, v in GGUF_UNSERVED.items())
    assert cfg.preset["engine"] == "gguf"
    assert cfg.preset["left_out"] == sorted(k for k, v in GGUF_UNSERVED.items() if asked.get(k, v) != v)
    assert (cfg.method, cfg.astro, cfg.transform) == (asked["method"], asked.get("astro", False),
                                                      asked.get("transform", "none"))
    changed = GGUF_CHANGED.get((quality, bits), {})
    assert cfg.preset["changed"] == {k: v for k, v in changed.items() if asked.get(k) != v}
    assert cfg.damp_percent == changed.get("damp_percent", asked.get("damp_percent", 0.01))
    if quality == "best":  # asked for anyway: the refusal names it
        with pytest.raises(ValueError, match="online_rotation='down' is not valid; allowed: 'none' with gguf_type"):
            AstroQuantConfig.recommended(bits, quality, gguf_type="Q4_K_M", online_rotation="down")


@pytest.mark.parametrize("family,transform,bits", [("llama3", "rotate", "4"), ("smollm", "scale", "3")])
def test_the_best_gguf_preset_runs_end_to_end_and_the_card_says_what_it_left_out(tmp_path, family, transform, bits):
    """`quantize --preset best --gguf-type Q4_K_M`, then `export --format gguf`: the residual rotation (per-channel
    scales where the embeddings are tied: the rotation would store lm_head twice), GPTAQ and Astro on the GGUF
    grids; the card names the preset, what a GGUF file cannot hold and why the transform was chosen."""
    from gguf import GGUFReader
    from test_gguf_writer import build_family

    from hf_astroquant import cli

    build_family(family, tmp_path / "fp")  # a Llama with a BPE tokenizer, as a GGUF file needs
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert cli.main(["quantize", str(tmp_path / "fp"), "--out", str(tmp_path / "q"), "--preset", "best", "--bits", bits,
                     "--gguf-type", "Q4_K_M", "--dataset", str(tmp_path / "calib.txt"), "--n-samples", "4",
                     "--seqlen", "32"]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["transforms_applied"]["transform"] == transform and config["astro"] and config["method"] == "gptaq"
    left = "`online_rotation`" + (", `refine_rounding_lr`, `refine_steps`" if bits == "3" else "")
    assert config["preset"]["left_out"] == ["online_rotation"] + (["refine_rounding_lr", "refine_steps"] if bits == "3"
                                                                  else [])
    card = (tmp_path / "q" / "README.md").read_text()
    changed = "; `damp_percent=0.01`" if bits == "4" else ""  # best's 4-bit damping goes with its online rotation
    assert f"`best` at {bits} bits, for a GGUF file (left out: {left}{changed})" in card
    assert ("residual rotation folds exactly" if transform == "rotate" else "a GGUF file stores them once") in card
    assert cli.main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    names = {t.name for t in GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert ("output.weight" in names) == (family == "llama3")  # the tied embedding is stored once


@pytest.mark.parametrize("argv,bits,damp", [(["--gguf-type", "Q2_K"], 2, 0.01), (["--gguf-type", "Q3_K_M"], 3, 0.01),
                                            (["--gguf-type", "Q4_0"], 4, 0.01), (["--gguf-type", "Q2_K", "--bits", "4"], 4, 0.01),
                                            (["--gguf-type", "Q4_0", "--damp-percent", "0.1"], 4, 0.1)])
def test_the_cli_preset_takes_its_width_from_the_gguf_type(argv, bits, damp):
    """`quantize --preset best --gguf-type Q2_K` is best at 2 bits, unless --bits says otherwise; a flag still
    overrides what the preset changes for GGUF."""
    from hf_astroquant.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--preset", "best", *argv])
    cfg = config_from_args(args)
    assert cfg.preset["bits"] == bits and cfg.damp_percent == damp and cfg.preset["engine"] == "gguf"


@pytest.mark.parametrize("name", ["Q3_K", "Q6_K"])
def test_a_signed_k_quant_never_gets_a_zero_step_and_gptq_stays_finite(name):
    """Per-channel scales can leave a sub-block far below its super-block's largest step; its integer step
    would round to 0, and GPTQ's w/a would then turn the layer into NaN (a Q2_K SmolLM2 did)."""
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    W[:, 16:32] *= 1e-4
    grid = fit_gguf_grid(W, name)
    assert (grid.a != 0).all()
    codes = quantize_codes(W, grid)
    assert _bitwise_equal(dequantize(codes, grid), decode(pack(codes, grid), name))
    X = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    result, _ = solve_linear(W, 2 * X.T @ X / 512, SolverOptions(bits=4, group_size=128, sym=False, mse=True,
                                                                 method="gptq", tensor_type=name))
    assert torch.isfinite(result.weight).all()
