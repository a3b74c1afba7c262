"""Astro (algorithms/astro.py) and the zero-cost transforms (algorithms/transforms.py,
folding.py): the math against slow references, exactness of every fold, and each option
end to end through from_pretrained, save and reload."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_astroquant  # noqa: F401  (registers the quantizer)
from hf_astroquant import AstroQuantConfig, QuantLinear
from hf_astroquant import folding as pc
from hf_astroquant.algorithms.astro import (astro_objective, astro_reshape, group_extent, prox_group_extent,
                                            water_level)
from hf_astroquant.algorithms.gptq import gptq_quantize, reconstruction_error
from hf_astroquant.algorithms.solve import SolverOptions, solve_linear
from hf_astroquant.algorithms.transforms import (excess_kurtosis, fixing_the_mean, hadamard, mean_keeping_rotation,
                                                 random_orthogonal, robust_z, rotation,
                                                 search_scales, scaled_rtn_error)
from hf_astroquant.blocks import find_blocks
from tiny import calib_ids, tiny_llama


def _problem(out=12, n=40, seed=0, tokens=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) * torch.linspace(0.2, 3, n)
    X[:, 3] *= 8  # one loud input channel
    W = torch.randn(out, n, generator=g)
    W[0, 5] = 6.0  # one weight outlier
    return W, 2 * X.t() @ X / tokens


# ------------------------------------------------------------------ Astro's proximal maps

def _prox_objective(u, v, tau, norm, d=None):
    rho = u.abs().max() if norm == "linf" else u.max() - u.min()
    d = torch.ones_like(v) if d is None else d
    return float(tau * rho + 0.5 * (d * (u - v).square()).sum())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("norm", ["linf", "range"])
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.7, 5.0, 50.0])
def test_prox_is_the_minimizer_against_a_brute_force_search(norm, tau, weighted):
    """The prox solves min_u τ·ρ(u) + ½·Σ d_i·(u_i − v_i)²; its solution is v clipped at levels (or,
    for the range, a constant), so search the levels on a fine grid (the slow, obviously correct
    reference) and compare objective values."""
    g = torch.Generator().manual_seed(int(tau * 100))
    for _ in range(5):
        v = torch.randn(7, generator=g, dtype=torch.float64)
        d = torch.rand(7, generator=g, dtype=torch.float64) * 5 + 0.1 if weighted else None
        got = prox_group_extent(v.unsqueeze(0), torch.tensor([tau], dtype=torch.float64), norm,
                                None if d is None else d.unsqueeze(0))[0]
        grid = torch.linspace(float(v.min()) - 0.01, float(v.max()) + 0.01, 301, dtype=torch.float64)
        if norm == "linf":
            best = min(_prox_objective(v.clamp(-t, t), v, tau, norm, d) for t in grid.clamp_min(0).tolist())
        else:
            best = min(_prox_objective(v.clamp(lo, hi), v, tau, norm, d)
                       for lo in grid.tolist() for hi in grid.tolist()[::3] if lo <= hi)
            best = min(best, min(_prox_objective(torch.full_like(v, c), v, tau, norm, d) for c in grid.tolist()))
        assert _prox_objective(got, v, tau, norm, d) <= best + 1e-6


def test_water_level_solves_its_equation():
    v = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    t = water_level(v, torch.tensor([1.5]))
    assert float((v - t).clamp_min(0).sum()) == pytest.approx(1.5)


def _level_by_sorting(v: torch.Tensor, budget: float) -> float:
    """The obvious reference: try each count k of values above the level, keep the consistent one."""
    s = sorted(v.tolist(), reverse=True)
    for k in range(1, len(s) + 1):
        t = (sum(s[:k]) - budget) / k
        if k == len(s) or s[k] <= t:
            return t
    raise AssertionError


def test_water_level_matches_the_sorting_reference_with_ties_and_extreme_budgets():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(200, 16, generator=g)
    rows[:50] = rows[:50].round()  # many ties
    budgets = torch.rand(200, generator=g) * 3
    budgets[:20] = 0.0  # the level is the maximum
    budgets[20:40] = 100.0  # the level falls below every value
    t = water_level(rows, budgets)
    for r in range(200):
        assert float(t[r]) == pytest.approx(_level_by_sorting(rows[r], float(budgets[r])), abs=1e-5)
        assert float((rows[r] - t[r]).clamp_min(0).sum()) == pytest.approx(float(budgets[r]), abs=1e-4)


def test_group_extent_handles_a_shorter_last_group():
    W = torch.arange(10.0).view(1, 10) - 4
    assert group_extent(W, 4, "linf").tolist() == [[4.0, 3.0, 5.0]]
    assert group_extent(W, 4, "range").tolist() == [[3.0, 3.0, 1.0]]


# ------------------------------------------------------------------ Astro's reshaping

@pytest.mark.parametrize("penalty", ["predicted", "paper"])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [8, 12, -1])  # 12 leaves a shorter last group of 40 columns
def test_astro_lowers_its_objective_and_group_extents(penalty, sym, group_size):
    W, H = _problem()
    beta = 1.0 if penalty == "predicted" else 0.05
    Wp = astro_reshape(W, H, beta=beta, steps=60, group_size=group_size, bits=3, sym=sym, penalty=penalty)
    f0 = astro_objective(W, W, H, beta, group_size, 3, sym, penalty)
    f1 = astro_objective(Wp, W, H, beta, group_size, 3, sym, penalty)
    assert f1 < f0
    gs = 40 if group_size == -1 else group_size
    assert group_extent(Wp, gs, "range").sum() < group_extent(W, gs, "range").sum()


def test_astro_moves_inside_the_flat_region():
    """Directions H does not see cost nothing: Astro uses them (the output on X barely moves)."""
    W, H = _problem()
    Wp = astro_reshape(W, H, beta=1.0, steps=100, group_size=8, bits=3)
    moved = float((Wp - W).norm() / W.norm())
    assert moved > 1e-3
    assert reconstruction_error(W, Wp, H) < moved ** 2  # H-weighted change far below the plain one


def test_astro_zero_beta_is_the_identity_and_dead_columns_stay():
    W, H = _problem()
    assert torch.equal(astro_reshape(W, H, beta=0.0, group_size=8), W)
    H[:, 7] = 0
    H[7, :] = 0
    Wp = astro_reshape(W, H, beta=1.0, steps=20, group_size=8, bits=3)
    assert torch.equal(Wp[:, 7], W[:, 7])


def test_astro_bad_penalty_is_named():
    W, H = _problem()
    with pytest.raises(ValueError, match="penalty='l2'.*predicted, paper"):
        astro_reshape(W, H, penalty="l2")


def test_astro_lowers_gptq_error_on_a_layer_with_outliers():
    """Astro then GPTQ (no clipping search) against GPTQ alone, both measured on the original W."""
    W, H = _problem(out=32, n=64, tokens=2000)
    plain = gptq_quantize(W, H, bits=3, group_size=16)
    res, _ = solve_linear(W, H, SolverOptions(bits=3, group_size=16, astro=True, astro_steps=100))
    assert reconstruction_error(W, res.weight, H) < reconstruction_error(W, plain.weight, H)


# ------------------------------------------------------------------ transform math

@pytest.mark.parametrize("n", [1, 8, 64])
def test_hadamard_and_rotations_are_orthogonal(n):
    for Q in (hadamard(n), random_orthogonal(n, 3), rotation(n, 1)[0]):
        assert torch.allclose(Q @ Q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert rotation(48, 0)[1] == "random_orthogonal" and rotation(64, 0)[1] == "hadamard"
    with pytest.raises(ValueError, match="power-of-two order, got 12"):
        hadamard(12)


@pytest.mark.parametrize("n", [8, 48, 64, 512])
def test_the_mean_keeping_rotation_is_orthogonal_keeps_row_means_and_still_spreads(n):
    """What a LayerNorm needs: h·Q keeps every row's mean, so centring commutes with the rotation."""
    Q, kind = mean_keeping_rotation(n, 1)
    assert torch.allclose(Q @ Q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    h = torch.randn(5, n, dtype=torch.float64) + 3
    assert torch.allclose((h @ Q).mean(-1), h.mean(-1), atol=1e-12)
    c = h - h.mean(-1, keepdim=True)
    assert torch.allclose((h @ Q) - (h @ Q).mean(-1, keepdim=True), c @ Q, atol=1e-12)
    # still spreads every channel over the others, about as a random orthogonal matrix (≈ 4.6/√n) or better
    assert float(Q.abs().max()) * n ** 0.5 < (4.0 if kind.startswith("random") else 2.5), kind
    assert torch.allclose(fixing_the_mean(Q), Q, atol=1e-12)  # nothing left to fix


def test_kurtosis_and_robust_z():
    g = torch.Generator().manual_seed(0)
    assert abs(excess_kurtosis(torch.randn(200000, generator=g))) < 0.1
    heavy = torch.randn(200000, generator=g) ** 3
    assert excess_kurtosis(heavy) > 10
    assert robust_z([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    z = robust_z([1.0, 2.0, 3.0, 100.0])
    assert z[-1] > 10 and z[0] < 0


def test_scale_search_never_worse_than_no_scales():
    W, H = _problem(out=16, n=32)
    s, alpha, ratio = search_scales([W], H, bits=3, group_size=8, sym=False)
    assert ratio <= 1.0
    assert scaled_rtn_error([W], H, s, 3, 8, False) <= scaled_rtn_error([W], H, torch.ones(32), 3, 8, False)
    assert alpha > 0  # one loud channel: protecting it pays


# ------------------------------------------------------------------ folding into a model

def _varied_llama(bias=False, tied=False, layers=2):
    """A tiny Llama whose norms are not all ones (so folding them matters), optionally tied."""
    m = tiny_llama(layers=layers, bias=bias)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if tied:
        m.lm_head.weight = m.model.embed_tokens.weight
        m.config.tie_word_embeddings = True
    return m


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _close(a, b):
    return float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_residual_and_value_output_rotations_keep_the_logits(bias, tied):
    m = _varied_llama(bias=bias, tied=tied)
    ids = calib_ids(2, 16)
    ref = _logits(m, ids)
    name, blocks = find_blocks(m)
    names = [f"{name}.{i}" for i in range(len(blocks))]
    sites = pc.check_foldable(m, blocks, names, "rotate")
    rec = pc.rotate_residual(m, sites, seed=0)
    assert rec["untied_lm_head"] is tied
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert m.config.tie_word_embeddings is False
    out = _logits(m, ids)
    assert _close(out, ref)
    assert not torch.equal(out, ref)  # something really was rotated
    assert all(torch.all(b.input_layernorm.weight == 1) for b in blocks)  # γ folded into q/k/v


@pytest.mark.parametrize("site,size", [("qkv", 64), ("gate_up", 64), ("vo", 32), ("down", 128)])
def test_every_scale_site_keeps_the_logits(site, size):
    m = _varied_llama(bias=True)
    ids = calib_ids(2, 16)
    ref = _logits(m, ids)
    bs = pc.block_sites(m, m.model.layers[1], "model.layers.1")
    assert pc.site_width(bs, site) == size
    pc.apply_scales(m, bs, site, torch.rand(size, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert _close(_logits(m, ids), ref)


class _OffsetNorm(nn.Module):  # Gemma-style: (1 + γ)·x/rms(x)
    def __init__(self, n, clamp=None):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(n, generator=torch.Generator().manual_seed(3)))
        self.eps, self.clamp = 1e-6, clamp

    def forward(self, x):
        y = (1 + self.weight) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return y if self.clamp is None else y.clamp(-self.clamp, self.clamp)


def test_an_offset_norm_folds_exactly_and_an_unknown_norm_or_layout_is_refused():
    m = _varied_llama()
    m.model.layers[1].post_attention_layernorm = _OffsetNorm(64)
    ids = calib_ids(2, 16)
    ref = _logits(m, ids)
    name, blocks = find_blocks(m)
    names = [f"{name}.{i}" for i in range(2)]
    pc.rotate_residual(m, pc.check_foldable(m, blocks, names, "rotate"), seed=0)
    assert _close(_logits(m, ids), ref)
    assert torch.all(m.model.layers[1].post_attention_layernorm.weight == 0)  # 1 + γ folded, γ′ = 0

    m.model.layers[1].post_attention_layernorm = _OffsetNorm(64, clamp=0.5)  # not a norm the folds know
    with pytest.raises(pc.TransformError, match=r"cannot fold exactly into LlamaForCausalLM \(llama\): "
                                                r"model.layers.1.post_attention_layernorm \(_OffsetNorm\) is neither"
                                                r".*Use transform='none'"):
        pc.check_foldable(m, blocks, names, "scale")
    with pytest.raises(pc.TransformError, match=r"blk has no input_layernorm.*Use transform='none'"):
        pc.block_sites(m, nn.Module(), "blk")


def test_a_wrong_fold_is_caught_on_the_logits():
    """The run-time guard: a fold that changes the function (here: a writer left out) is an error."""
    m = _varied_llama()
    name, blocks = find_blocks(m)
    sites = pc.check_foldable(m, blocks, [f"{name}.{i}" for i in range(2)], "rotate")
    sites[1].writers.pop()  # down_proj of block 1 would not be rotated
    before = pc.probe_logits(m)
    pc.rotate_residual(m, sites, seed=0)
    with pytest.raises(pc.TransformError, match=r"did not keep the model.s function .*adapters.py"):
        pc.check_kept(before, pc.probe_logits(m), torch.float32, "the residual rotation")


def test_adaptive_choices_follow_the_kurtosis_z_score():
    kurt = [{"qkv": 1.0, "gate_up": 1.0, "vo": 1.0, "down": 1.0} for _ in range(6)]
    kurt[2] = {"qkv": 50.0, "gate_up": 50.0, "vo": 50.0, "down": 50.0}
    kurt[4]["down"] = 1.5
    for k in kurt:
        k["down"] += 0.01 * len(k)  # a non-zero MAD
    choices = pc.adaptive_choices(kurt, thr_attn=3.0, thr_mlp=1e9)
    assert choices[2] == {"qkv": "rotate", "gate_up": "scale", "vo": "rotate", "down": "scale"}
    assert choices[0] == {"qkv": "scale", "gate_up": "scale", "vo": "scale", "down": "scale"}
    assert pc.adaptive_choices(kurt, thr_attn=3.0, thr_mlp=3.0)[2]["down"] == "none"


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("varied")
    _varied_llama(tied=True).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kw", [dict(transform="rotate"), dict(transform="scale"), dict(transform="adaptive"),
                                dict(transform="adaptive", kurtosis_threshold_attn=-10.0, kurtosis_threshold_mlp=-10.0),
                                dict(astro=True), dict(astro=True, astro_beta=0.5, astro_steps=5, astro_lr=0.5),
                                dict(transform="rotate", method="rescomp", astro=True),
                                dict(transform="rotate", method="rtn")])
def test_preconditioning_options_end_to_end(varied_dir, tmp_path, kw):
    """Quantize, save, reload in the plain format: same logits, choices recorded, and the
    checkpoint holds the same packed tensors as a run without preconditioning."""
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(), **kw)
    model = AutoModelForCausalLM.from_pretrained(varied_dir, quantization_config=cfg)
    applied = model.config.quantization_config.transforms_applied
    if kw.get("transform"):
        assert set(applied["blocks"]) == {"model.layers.0", "model.layers.1"}
        assert all(set(c) >= {"qkv", "gate_up", "vo", "down"} for c in applied["blocks"].values())
        if kw.get("kurtosis_threshold_attn") == -10.0:  # every z-score above: rotation/nothing everywhere
            assert all(c["vo"] == "rotate" and c["down"] == "none" for c in applied["blocks"].values())
    else:
        assert applied is None
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["transforms_applied"] == applied
    if kw.get("transform") in ("rotate", "adaptive"):
        assert saved["tie_word_embeddings"] is False  # untied so the final norm folds into lm_head
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calib_ids(2, 16)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    plain = AutoModelForCausalLM.from_pretrained(varied_dir, quantization_config=AstroQuantConfig(
        bits=4, group_size=32, dataset=calib_ids()))
    shapes = {n: (m.qweight.shape, m.scales.shape, m.qzeros.shape) for n, m in plain.named_modules()
              if isinstance(m, QuantLinear)}
    assert shapes == {n: (m.qweight.shape, m.scales.shape, m.qzeros.shape) for n, m in reloaded.named_modules()
                      if isinstance(m, QuantLinear)}


def test_rotation_lowers_the_error_of_a_model_with_an_outlier_channel(tmp_path):
    """A residual channel with a huge scale (what rotations are for): rotating spreads it and the
    3-bit model lands closer to full precision than without. On the min/max grid, where an outlier
    costs most (the clipping search, a default, already absorbs much of it on this tiny model)."""
    m = _varied_llama(layers=2)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 7] *= 30
    m.save_pretrained(tmp_path)
    ids = calib_ids(4, 32, seed=9)
    ref = _logits(m, ids)
    errs = {}
    for t in ("none", "rotate"):
        q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=AstroQuantConfig(
            bits=3, group_size=32, dataset=calib_ids(), transform=t, mse=False))
        errs[t] = float((_logits(q, ids) - ref).norm() / ref.norm())
    assert errs["rotate"] < errs["none"], errs


def test_transform_with_offloaded_blocks_is_refused(tmp_path):
    _varied_llama().save_pretrained(tmp_path)
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(), transform="rotate")
    with pytest.raises(ValueError, match="needs every block's weights in memory"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map={
            "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}, offload_folder=str(tmp_path / "off"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norms_are_recognised_and_the_rotation_passes_its_check(dtype):
    """A bf16/fp16 norm rounds its own output: it is still the RMSNorm it is (it used to be refused)."""
    from hf_astroquant.adapters import norm_kind

    m = _varied_llama().to(dtype)
    assert norm_kind(m.model.layers[0].input_layernorm) == "rms"
    name, blocks = find_blocks(m)
    before = pc.probe_logits(m)
    pc.rotate_residual(m, pc.check_foldable(m, blocks, [f"{name}.{i}" for i in range(2)], "rotate"), seed=0)
    assert pc.check_kept(before, pc.probe_logits(m), dtype, "the residual rotation") < 0.05
