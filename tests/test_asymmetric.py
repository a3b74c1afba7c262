"""GPTAQ, ResComp, the target interpolation, successive rounding and the bounded search, each
against a slow float64 reference on small random problems."""

import math

import pytest
import torch

from hf_astroquant import AstroQuantConfig
from hf_astroquant.algorithms import SolverOptions, gptq_quantize, solve_linear, successive_quantize
from hf_astroquant.algorithms.beam import beam_step
from hf_astroquant.algorithms.gptaq import gptaq_p_matrix, rescomp_r_from_p, rescomp_r_matrix
from hf_astroquant.algorithms.gptq import damped_inverse_cholesky
from hf_astroquant.algorithms.grid import dequantize, fit_groups, quantize
from hf_astroquant.algorithms.rtn import rtn_quantize
from hf_astroquant.algorithms.interpolation import asymmetric_target, auto_alpha, projected_alpha
from hf_astroquant.algorithms.successive import successive_objective_terms
from reference import layer_objective


def asym_problem(rows, cols, tokens, seed, drift=0.3):
    """W, the quantized model's inputs X and the full-precision inputs X̃ = X + ΔX (tokens × in),
    and the statistics H = 2XᵀX/N, D = 2ΔXᵀX/N, G = 2ΔXᵀΔX/N."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 2 * mix)
    X *= torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    # the drift is partly a function of X (what quantizing earlier layers does) and partly noise
    A = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    dX = drift * (X @ A + 0.5 * X.std(0) * torch.randn(tokens, cols, generator=g, dtype=torch.float64))
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    n = tokens
    return W, X, X + dX, 2 * X.t() @ X / n, 2 * dX.t() @ X / n, 2 * dX.t() @ dX / n


def asym_objective(Q, W, X, Xfp):
    """‖Q·X − W·X̃‖² (rows of X are tokens)."""
    return float(((X @ Q.double().t() - Xfp @ W.double().t()) ** 2).sum())


def reference_sweep(W, H, D, *, bits, group_size, alpha, residual, damp_percent=0.01):
    """Slow GPTAQ / ResComp in float64 as the papers write them: no lazy batches, left to right,
    static grids, explicit P and R matrices, no clamping."""
    W = W.double().clone()
    W0 = W.clone()
    rows, cols = W.shape
    Hd = H.double() + damp_percent * torch.diag(H.double()).mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    P = alpha * torch.triu(D.double() @ U.t(), 1) @ U
    R = alpha * torch.triu((D.double() + H.double()) @ U.t(), 1) @ U
    scales, zeros = fit_groups(W.float(), group_size, bits, False)
    Q = torch.zeros_like(W)
    for i in range(cols):
        s, z = scales[i // group_size].double(), zeros[i // group_size].double()
        w = W[:, i].clone()
        q = dequantize(quantize(w, s, z, bits), s, z)
        Q[:, i] = q
        err = (w - q) / U[i, i]
        upd = torch.outer(err, U[i, i + 1:]) - torch.outer(w, P[i, i + 1:])
        if residual:
            upd -= torch.outer(W0[:, i] - w, R[i, i + 1:])
        W[:, i + 1:] -= upd
    return Q


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptaq_and_rescomp_match_the_slow_reference(residual, bits):
    W, X, Xfp, H, D, _ = asym_problem(12, 48, 600, seed=bits)
    ref = reference_sweep(W, H, D, bits=bits, group_size=16, alpha=0.25, residual=residual)
    res = gptq_quantize(W.float(), H.float(), bits=bits, group_size=16, static_groups=True, dxxt=D.float(),
                        alpha=0.25, residual=residual, clamp=False, block_size=7)
    mismatch = (res.weight.double() - ref).abs() > 1e-4
    assert mismatch.float().mean() < 0.02  # float32 vs float64 may flip a rare rounding tie
    assert asym_objective(res.weight, W, X, Xfp) == pytest.approx(asym_objective(ref, W, X, Xfp), rel=2e-2)


def test_rescomp_without_the_stream_is_the_residual_on_gptq():
    """asym_alpha=0: no D; rescomp is GPTQ plus ResComp's residual with X̃ = X (the slow reference
    with D = 0), and gptaq is GPTQ, bit for bit."""
    W, _, _, H, _, _ = asym_problem(12, 48, 600, seed=5)
    ref = reference_sweep(W, H, torch.zeros_like(H), bits=3, group_size=16, alpha=0.25, residual=True)
    res = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, static_groups=True, alpha=0.25, residual=True,
                        clamp=False, block_size=7)
    assert ((res.weight.double() - ref).abs() > 1e-4).float().mean() < 0.02
    plain = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, static_groups=True)
    assert not torch.equal(res.weight, plain.weight)  # the residual does change the solution
    grid = dict(bits=3, group_size=16, static_groups=True, asym_alpha=0.0)
    rescomp, gptaq = SolverOptions(method="rescomp", **grid), SolverOptions(method="gptaq", **grid)
    assert not rescomp.needs_fp_stream and not gptaq.needs_fp_stream
    out, a = solve_linear(W.float(), H.float(), rescomp)  # no D given: none is needed
    same = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, static_groups=True, alpha=0.25, residual=True)
    assert a == 0.0 and torch.equal(out.weight, same.weight)
    assert torch.equal(solve_linear(W.float(), H.float(), gptaq)[0].weight, plain.weight)


def test_rescomp_identity_holds_with_damping():
    W, X, Xfp, H, D, _ = asym_problem(4, 40, 500, seed=7)
    for damp in (0.01, 0.1):
        U, _ = damped_inverse_cholesky(H, damp)
        P = gptaq_p_matrix(D, U, 0.25)
        R = rescomp_r_matrix(D, H, U, 0.25)  # H undamped, as the paper writes it
        assert torch.allclose(R, rescomp_r_from_p(P, U, 0.25), rtol=1e-9, atol=1e-9 * R.abs().max())
        assert torch.equal(torch.tril(P), torch.zeros_like(P))


@pytest.mark.parametrize("residual", [False, True])
def test_asymmetric_solvers_beat_gptq_on_the_asymmetric_objective(residual):
    ratios = []
    for seed in range(6):
        W, X, Xfp, H, D, _ = asym_problem(32, 64, 800, seed=seed)
        kw = dict(bits=3, group_size=32, desc_act=True, static_groups=True)
        g = gptq_quantize(W.float(), H.float(), **kw)
        a = gptq_quantize(W.float(), H.float(), dxxt=D.float(), alpha=1.0, residual=residual, **kw)
        ratios.append(asym_objective(a.weight, W, X, Xfp) / asym_objective(g.weight, W, X, Xfp))
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.9


def test_interpolated_target_has_gptqs_quadratic_form():
    """‖W·X_α − Q·X‖² = tr((Q − W_ref)·H·(Q − W_ref)ᵀ) + const: differences between two Qs agree."""
    W, X, Xfp, H, D, _ = asym_problem(6, 24, 400, seed=3)
    alpha = 0.6
    Xa = X + alpha * (Xfp - X)
    Wref = asymmetric_target(W, H, D, alpha, damp_percent=1e-12).double()
    g = torch.Generator().manual_seed(0)
    Q1, Q2 = (W + 0.3 * torch.randn(W.shape, generator=g, dtype=torch.float64) for _ in range(2))
    direct = [float(((Xa @ W.t() - X @ Q.t()) ** 2).sum()) * 2 / X.shape[0] for Q in (Q1, Q2)]
    quad = [layer_objective(Wref, Q, H) for Q in (Q1, Q2)]
    assert direct[0] - direct[1] == pytest.approx(quad[0] - quad[1], rel=1e-4)
    assert torch.allclose(asymmetric_target(W, H, D, 0.0), W.float())


def test_auto_alpha_is_the_closest_target_to_q():
    W, X, Xfp, H, D, _ = asym_problem(8, 32, 500, seed=4)
    Q = W.double() + 0.2 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Q = Q + 0.5 * (asymmetric_target(W, H, D, 1.0, 1e-12).double() - W.double())  # pull toward the target
    a = auto_alpha(W, Q, H, D, damp_percent=1e-12)
    assert 0 < a < 1
    grid = torch.linspace(0, 1, 101)
    dist = [layer_objective(asymmetric_target(W, H, D, float(t), 1e-12).double(), Q, H) for t in grid]
    assert abs(float(grid[int(torch.tensor(dist).argmin())]) - a) <= 0.011
    assert auto_alpha(W, W.double() - 10 * (Q - W.double()), H, D, 1e-12) == 0.0  # clamped


def test_projected_alpha_is_the_reachable_share_of_the_mismatch():
    W, X, Xfp, H, D, G = asym_problem(8, 32, 500, seed=5)
    M = (Xfp - X) @ W.t()  # W·ΔX, tokens × rows
    proj = X @ torch.linalg.solve(X.t() @ X, X.t() @ M)  # projection onto the column space of X
    expected = float((proj ** 2).sum() / (M ** 2).sum())
    assert projected_alpha(W, H, D, G, damp_percent=1e-12) == pytest.approx(expected, rel=1e-5)
    # a mismatch that is a linear function of X is fully reachable
    Xlin = X @ (0.2 * torch.eye(32, dtype=torch.float64))
    D2, G2 = 2 * Xlin.t() @ X / 500, 2 * Xlin.t() @ Xlin / 500
    assert projected_alpha(W, H, D2, G2, damp_percent=1e-12) == pytest.approx(1.0, rel=1e-6)


def test_successive_rounding_is_gptqs_greedy_sweep_in_closed_form():
    for seed in range(3):
        W, X, _, H, _, _ = asym_problem(16, 48, 600, seed=seed)
        s = successive_quantize(W.float(), H.float(), bits=3, group_size=16, block_size=5)
        g = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, desc_act=True, static_groups=True)
        assert torch.equal(s.g_idx, g.g_idx)
        assert ((s.weight - g.weight).abs() > 1e-4).float().mean() < 0.02
        assert layer_objective(W, s.weight, H) == pytest.approx(layer_objective(W, g.weight, H), rel=2e-2)
        g_idx = s.g_idx.long()
        assert torch.equal((s.codes - s.zeros[g_idx].t()).float() * s.scales[g_idx].t(), s.weight)


def test_successive_objective_splits_into_column_terms():
    W, X, _, H, _, _ = asym_problem(5, 20, 300, seed=6)
    L = torch.linalg.cholesky(H)
    Q = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    split = successive_objective_terms(W, Q, L).sum()
    assert float(split) == pytest.approx(layer_objective(W, Q, H), rel=1e-9)


def test_beam_step_keeps_the_k_best_expansions_of_every_level():
    g = torch.Generator().manual_seed(0)
    rows, K, maxq = 5, 3, 7
    w = torch.randn(rows * K, generator=g) * 2
    s = torch.full((rows * K,), 0.5)
    z = torch.full((rows * K,), 4.0)
    cost = torch.rand(rows, K, generator=g)
    new_cost, src, q = beam_step(w, s, z, maxq, 0.7, cost)
    for r in range(rows):  # brute force over every (beam, level)
        cands = sorted((float(cost[r, k] + ((w[r * K + k] - (lv - 4) * 0.5) / 0.7) ** 2), k, lv)
                       for k in range(K) for lv in range(maxq + 1))[:K]
        assert torch.allclose(new_cost[r], torch.tensor([c[0] for c in cands]), rtol=1e-6)
        assert [int(src[r * K + j]) - r * K for j in range(K)] == [c[1] for c in cands]
        assert [int(q[r * K + j]) for j in range(K)] == [c[2] for c in cands]


def test_beam_width_one_is_the_greedy_sweep():
    W, X, Xfp, H, D, _ = asym_problem(16, 48, 600, seed=8)
    for kw in (dict(), dict(dxxt=D.float()), dict(dxxt=D.float(), residual=True)):
        greedy = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, desc_act=True, static_groups=True, **kw)
        beam1 = gptq_quantize(W.float(), H.float(), bits=3, group_size=16, desc_act=True, beam_width=1, **kw)
        assert torch.equal(greedy.weight, beam1.weight) and torch.equal(greedy.codes, beam1.codes)


def exhaustive_optimum(W, H, scales, zeros, group_size, bits):
    """min over every code assignment of tr((Q − W)·H·(Q − W)ᵀ), row by row (tiny problems)."""
    import itertools

    rows, cols = W.shape
    levels = torch.tensor(list(itertools.product(range(2**bits), repeat=cols)), dtype=torch.float64)
    g = torch.arange(cols) // group_size
    best = 0.0
    for r in range(rows):
        Q = (levels - zeros[g, r].double()) * scales[g, r].double()
        dQ = Q - W[r].double()
        best += float(((dQ @ H.double()) * dQ).sum(1).min())
    return best


def test_a_wide_enough_beam_finds_the_exact_optimum():
    W, X, _, H, _, _ = asym_problem(3, 5, 100, seed=9)
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(5, dtype=torch.float64)  # the solver damps; make it exact
    bits = 2
    res = gptq_quantize(W.float(), H.float(), bits=bits, group_size=-1, desc_act=True, beam_width=4**4,
                        damp_percent=1e-9)
    scales, zeros = fit_groups(W.float(), 5, bits, False)
    assert layer_objective(W, res.weight, H) == pytest.approx(exhaustive_optimum(W, H, scales, zeros, 5, bits),
                                                              rel=1e-4)


@pytest.mark.parametrize("residual", [None, False, True])
def test_beam_search_does_not_lose_to_greedy_on_average(residual):
    ratios = []
    for seed in range(5):
        W, X, Xfp, H, D, _ = asym_problem(24, 64, 800, seed=20 + seed)
        kw = dict(bits=3, group_size=32, desc_act=True, static_groups=True)
        if residual is not None:
            kw.update(dxxt=D.float(), residual=residual)
        greedy = gptq_quantize(W.float(), H.float(), **kw)
        beam = gptq_quantize(W.float(), H.float(), beam_width=4, **kw)
        ratios.append(layer_objective(W, beam.weight, H) / layer_objective(W, greedy.weight, H))
    if residual is None:  # plain GPTQ: the beam minimizes exactly this objective
        assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.97
    else:
        assert sum(ratios) / len(ratios) < 1.0


@pytest.mark.parametrize("method", ["gptq", "gptaq", "rescomp"])
@pytest.mark.parametrize("asym_alpha", [None, 0.5, "auto", "projected"])
@pytest.mark.parametrize("rounding", ["gptq", "beam", "successive"])
def test_every_solver_combination_runs_and_reports_its_alpha(method, asym_alpha, rounding):
    W, X, Xfp, H, D, G = asym_problem(8, 32, 300, seed=11)
    opts = SolverOptions(bits=3, group_size=16, desc_act=True, static_groups=True, method=method,
                         asym_alpha=asym_alpha, rounding=rounding, beam_width=2)
    if rounding == "successive" and method != "gptq":
        with pytest.raises(ValueError, match="successive"):
            solve_linear(W.float(), H.float(), opts, D.float(), G.float())
        return
    res, a = solve_linear(W.float(), H.float(), opts, D.float(), G.float())
    assert 0.0 <= a <= 1.0
    if asym_alpha is None:
        assert a == (0.0 if method == "gptq" else 1.0)
    elif asym_alpha == 0.5:
        assert a == 0.5
    # the weights are exactly the grid's values of the returned codes
    g = res.g_idx.long()
    assert res.codes.min() >= 0 and res.codes.max() <= 2**3 - 1
    assert torch.equal(res.weight, (res.codes - res.zeros[g].t()).float() * res.scales[g].t())
    # and they solve the combination's own problem better than round-to-nearest on the same grid:
    # ‖Q·X − W·X_α‖² with X_α = X + α·ΔX
    X_a = X + a * (Xfp - X)
    rtn = rtn_quantize(W.float(), bits=3, group_size=16).weight
    assert asym_objective(res.weight, W, X, X_a) < 0.9 * asym_objective(rtn, W, X, X_a)


def test_solver_needs_d_for_asymmetric_options():
    W, X, Xfp, H, D, G = asym_problem(4, 16, 100, seed=12)
    with pytest.raises(ValueError, match="full-precision"):
        solve_linear(W.float(), H.float(), SolverOptions(bits=4, method="gptaq"))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rescomp_is_its_own_solver_at_every_width_and_the_config_refuses_it_below_3_bits(bits):
    W, X, Xfp, H, D, G = asym_problem(8, 32, 300, seed=12)
    common = dict(bits=bits, group_size=16, desc_act=True, static_groups=True)
    res = {m: solve_linear(W.float(), H.float(), SolverOptions(method=m, **common), D.float())[0]
           for m in ("gptaq", "rescomp")}
    assert not torch.equal(res["gptaq"].weight, res["rescomp"].weight)  # no silent substitution
    if bits < 3:
        with pytest.raises(ValueError, match="use method='gptaq'"):
            AstroQuantConfig(bits=bits, method="rescomp")
    else:
        assert AstroQuantConfig(bits=bits, method="rescomp").method == "rescomp"
