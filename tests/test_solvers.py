"""The composed layer solver (algorithms/solve.py): every target × correction × rounding of the
registry against the functions it is built from, the public options' mapping onto recipes, the
combinations refused, and the factorizations a stage shares (algorithms/factors.py)."""

import itertools

import pytest
import torch
from test_asymmetric import asym_problem
from tiny import calib_ids, save_tiny
from transformers import AutoModelForCausalLM

from hf_astroquant import AstroQuantConfig
from hf_astroquant.algorithms import gptq as gptq_module
from hf_astroquant.algorithms.astro import astro_reshape
from hf_astroquant.algorithms.factors import HessianFactors
from hf_astroquant.algorithms.gptq import gptq_quantize
from hf_astroquant.algorithms.interpolation import asymmetric_target
from hf_astroquant.algorithms.rtn import rtn_quantize
from hf_astroquant.algorithms.solve import (CORRECTIONS, ROUNDINGS, TARGETS, Recipe, SolverOptions, recipe_of,
                                            solve_linear)
from hf_astroquant.algorithms.successive import successive_quantize


def _valid(t, c, r) -> bool:
    try:
        Recipe(t, c, r)
        return True
    except ValueError:
        return False


ALL = list(itertools.product(TARGETS, CORRECTIONS, ROUNDINGS))
VALID = [combo for combo in ALL if _valid(*combo)]
GRID = dict(bits=3, group_size=16, desc_act=True, static_groups=True, damp_percent=0.01, block_size=128, mse=False)


def test_the_registry_refuses_exactly_the_combinations_without_a_form():
    refused = sorted(set(ALL) - set(VALID))
    # the asymmetric target lives in the sweep's P: no P-carrying correction, no asymmetric target
    assert ("asymmetric", "none", "greedy") in refused
    # successive and nearest have no sweep for a correction; nearest no Hessian for a target
    assert all(r in ("successive", "nearest") for t, c, r in refused if c == "rescomp")
    assert ("interpolated", "none", "nearest") in refused
    assert ("interpolated", "none", "successive") not in refused
    assert ("symmetric", "gptaq", "greedy") in refused  # GPTAQ's correction is its P-term, nothing else
    # greedy and beam: symmetric and interpolated × (none | rescomp), asymmetric × (gptaq | rescomp);
    # successive: symmetric and interpolated; nearest: symmetric
    assert len(VALID) == 2 * 6 + 2 + 1
    with pytest.raises(ValueError, match=r"rounding='sideways' is not valid; allowed: greedy, beam"):
        Recipe("symmetric", "none", "sideways")
    with pytest.raises(ValueError, match="target='asymmetric' with correction='none'"):
        Recipe("asymmetric", "none", "greedy")


@pytest.mark.parametrize("target,correction,rounding", VALID)
def test_every_composed_solver_is_the_function_it_names(target, correction, rounding):
    W, X, Xfp, H, D, G = (t.float() for t in asym_problem(8, 48, 300, seed=21))
    a = 0.5
    opts = SolverOptions(**GRID, method="gptq", asym_alpha=a if target != "symmetric" else None, beam_width=3)
    res, alpha = solve_linear(W, H, opts, D, G, recipe=Recipe(target, correction, rounding))
    aim = asymmetric_target(W, H, D, a) if target == "interpolated" else W
    carried = dict(dxxt=a * D if target == "asymmetric" else None, residual=correction == "rescomp")
    if rounding == "nearest":
        expected = rtn_quantize(W, bits=3, group_size=16)
    elif rounding == "successive":
        expected = successive_quantize(aim, H, **{k: v for k, v in GRID.items() if k not in ("desc_act", "static_groups")})
    else:
        expected = gptq_quantize(aim, H, **GRID, **carried, beam_width=3 if rounding == "beam" else None)
    assert torch.equal(res.weight, expected.weight) and torch.equal(res.codes, expected.codes)
    assert alpha == (a if target != "symmetric" else 0.0) or rounding == "nearest"


@pytest.mark.parametrize("method,asym_alpha,rounding,expected", [
    ("rtn", None, "gptq", ("symmetric", "none", "nearest")),
    ("gptq", None, "gptq", ("symmetric", "none", "greedy")),
    ("gptq", 0.5, "beam", ("interpolated", "none", "beam")),
    ("gptq", "auto", "successive", ("interpolated", "none", "successive")),
    ("gptaq", None, "gptq", ("asymmetric", "gptaq", "greedy")),
    ("gptaq", 0, "gptq", ("symmetric", "none", "greedy")),
    ("gptaq", "projected", "beam", ("asymmetric", "gptaq", "beam")),
    ("rescomp", None, "beam", ("asymmetric", "rescomp", "beam")),
    ("rescomp", 0, "gptq", ("symmetric", "rescomp", "greedy")),
])
def test_the_public_options_name_these_recipes(method, asym_alpha, rounding, expected):
    assert recipe_of(SolverOptions(bits=4, method=method, asym_alpha=asym_alpha, rounding=rounding)) == Recipe(*expected)


@pytest.mark.parametrize("method", ["gptaq", "rescomp"])
def test_successive_rounding_has_no_form_for_a_correction(method):
    with pytest.raises(ValueError, match=f"rounding='successive' .* method='{method}'"):
        recipe_of(SolverOptions(bits=4, method=method, rounding="successive"))


@pytest.mark.parametrize("method,asym_alpha,rounding", [
    ("gptq", "auto", "gptq"), ("gptq", "projected", "successive"), ("gptaq", "auto", "beam"), ("rescomp", None, "gptq"),
])
def test_linears_sharing_one_hessian_get_the_same_bits_from_shared_factors(method, asym_alpha, rounding):
    # q/k/v share H: one HessianFactors serves all three, Astro, α and the sweep, and changes no bit
    W, X, Xfp, H, D, G = (t.float() for t in asym_problem(24, 48, 300, seed=22))
    opts = SolverOptions(**GRID, method=method, asym_alpha=asym_alpha, rounding=rounding, astro=True, beam_width=2)
    shared = HessianFactors(H, opts.damp_percent)
    for member in W.split(8):
        alone, a1 = solve_linear(member, H, opts, D, G)
        together, a2 = solve_linear(member, H, opts, D, G, shared)
        assert a1 == a2 and torch.equal(alone.weight, together.weight) and torch.equal(alone.codes, together.codes)
    # every form was factored once for the three Linears
    assert len(shared.computed) == len(set(shared.computed)) and shared.computed
    assert torch.equal(astro_reshape(W, H, group_size=16, bits=3, factors=shared),
                       astro_reshape(W, H, group_size=16, bits=3))


def test_shared_factors_of_another_hessian_are_refused():
    H = torch.eye(8)
    with pytest.raises(ValueError, match="another Hessian"):
        gptq_quantize(torch.randn(4, 16), torch.eye(16), bits=4, factors=HessianFactors(H, 0.01))


def test_a_stage_factors_its_hessian_once_for_all_its_linears_astro_and_alpha(tmp_path, monkeypatch):
    """Per block the stages q/k/v, o, gate/up and down: with Astro and α* each stage's H is factored
    once in the weight's order and once in the sweep's, however many Linears share it (before
    sharing: once per Linear for Astro, twice more for α and the target, once more for the sweep)."""
    save_tiny(tmp_path, layers=2)
    calls = {"cholesky": 0, "sweep": 0}
    real_chol, real_inv = gptq_module.damped_cholesky, gptq_module.damped_inverse_cholesky

    def chol(*a, **k):
        calls["cholesky"] += 1
        return real_chol(*a, **k)

    def inv(*a, **k):
        calls["sweep"] += 1
        return real_inv(*a, **k)

    monkeypatch.setattr(gptq_module, "damped_cholesky", chol)
    monkeypatch.setattr(gptq_module, "damped_inverse_cholesky", inv)
    cfg = AstroQuantConfig(bits=4, group_size=32, dataset=calib_ids(8, 32), astro=True, asym_alpha="auto",
                           calibration_batch_size=4)
    AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    assert calls == {"cholesky": 2 * 4, "sweep": 2 * 4}
