"""Astro: activation-guided structured regularization of a Linear's weights before rounding.

Over-parameterized layers sit in a flat region: many weights W′ give nearly the same output as
W on the calibration inputs. Astro picks, inside that region, weights whose groups have small
extents where rounding errors are amplified, so the grid that the solver fits to each group is
finer there. Per layer, from H = 2·X·Xᵀ/N alone (no second pass over the activations):

    F(W′) = tr((W′ − W)·H·(W′ − W)ᵀ)  +  β · Σ_r Σ_g c_g · ρ(W′[r, g])² / (12·(2^b − 1)²)

g runs over the quantization groups of input columns and ρ is the group's extent as the grid
sees it: max − min for an asymmetric grid ("range"), 2·‖·‖_∞ for a symmetric one ("linf").
ρ²/(12·(2^b − 1)²) is the mean squared rounding error of a uniform grid spanning ρ, and
c_g = Σ_{i∈g} 1/[H⁻¹]_ii is what one unit of squared error in column i costs the output after
GPTQ-style compensation by the other columns. The second term is therefore GPTQ's predicted
error, in the units of the first, and β = 1 trades the two exactly; no per-layer tuning.

This is our form. The published summary (``penalty="paper"``) uses a linear extent weighted by
the activation norm a_g = (Σ_{i∈g} H_ii)^½, with both terms divided by their value at W:
    F(W′) = tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ) + β·Σ a_g·ρ(W′[r, g]) / Σ a_g·ρ(W[r, g]).
On SmolLM2-135M layers at 3 bits g64 (`benchmarks/bench_astro.py`) it lowers the solved layer's
error less than the predicted-error form at its best β and raises it above GPTQ's at larger β;
the predicted-error form needs no β search, so it is the default.

The smooth term has gradient 2·(W′ − W)·H. Input columns' activation scales differ by orders of
magnitude, so FISTA works in the Jacobi metric D = diag(H): the step is
z = y − (W′-gradient)·D⁻¹/L with L = 2·λ_max(D^-½·H·D^-½)/lr, then the proximal map of the group
term in the metric ½·Σ d_i·(x_i − z_i)², exact and separable per (row, group):

    prox of τ·‖v‖_∞ :  |v| clipped at the level t ≥ 0 with Σ d_i·(|v_i| − t)_+ = τ, signs kept;
    prox of τ·(max v − min v) :  v clipped from above at t_hi with Σ d_i·(v_i − t_hi)_+ = τ and
                       from below at t_lo with Σ d_i·(t_lo − v_i)_+ = τ; when t_lo > t_hi the whole
                       group becomes its d-weighted mean (the range's subdifferential at a constant
                       vector is {u : Σu = 0, ‖u‖₁ ≤ 2}).

(τ here is the group term's weight divided by L.) On ill-conditioned H this closes in 50 steps
about half the gap that plain steps of 1/(2·λ_max(H)) leave at 300.

For the squared extent the step uses the weight β·c_g·2·ρ(y) at the current point y: a fixed point
of that iteration satisfies 0 ∈ ∇(first term) + β·c_g·∂(ρ²), the exact optimality condition.
Dead input columns (H_ii = 0) are left as they are: the solver zeroes them anyway.
"""

from __future__ import annotations

import math

import torch

from .factors import HessianFactors, factors_of

NORMS = ("linf", "range")
PENALTIES = ("predicted", "paper")


def water_level(values: torch.Tensor, budget: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of `values` (..., n): the level t with Σ_i d_i·(values_i − t)_+ = budget (budget ≥ 0,
    weights d > 0, all 1 when not given).

    f(t) = Σ d_i·(v_i − t)_+ − budget is convex, piecewise linear and decreasing. Newton's method
    from t₀ = v_j − budget/d_j (j the largest value; f(t₀) ≥ 0, so t₀ ≤ t*) never overshoots: each
    step t ← (Σ_{v_i ≥ t} d_i·v_i − budget) / Σ_{v_i ≥ t} d_i stays ≤ t* by convexity and is exact
    as soon as the set {v_i ≥ t} stops changing, which takes a few steps (at most n). No sort: the
    solver calls this for every (row, group) at every step, and sorting short rows was its hot spot."""
    v = values
    if weights is None:
        weights = torch.ones_like(v)
    j = v.argmax(-1, keepdim=True)
    top = v.gather(-1, j)
    t = top.squeeze(-1) - budget / weights.gather(-1, j).squeeze(-1)
    # the largest value is always above t* (budget ≥ 0); keeping it active stops round-off in a
    # weighted mean from emptying the set when the budget is 0
    is_top = v == top
    active = (v >= t.unsqueeze(-1)) | is_top
    for _ in range(v.shape[-1] + 1):
        d = torch.where(active, weights, 0)
        t = ((d * v).sum(-1) - budget) / d.sum(-1)
        new_active = (v >= t.unsqueeze(-1)) | is_top
        if torch.equal(new_active, active):
            break
        active = new_active
    return t


def prox_group_extent(v: torch.Tensor, tau: torch.Tensor, norm: str = "linf",
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """The proximal map of τ·ρ(v) for each row of v (..., n), τ (...) ≥ 0; ρ = ‖·‖_∞ or max − min,
    in the metric ½·Σ d_i·(x_i − v_i)² (d = `weights`, all 1 when not given)."""
    if norm == "linf":
        t = water_level(v.abs(), tau, weights).clamp_min(0)
        return v.sign() * torch.minimum(v.abs(), t.unsqueeze(-1))
    if norm == "range":
        hi = water_level(v, tau, weights).unsqueeze(-1)
        lo = -water_level(-v, tau, weights).unsqueeze(-1)
        out = torch.minimum(torch.maximum(v, lo), hi)
        collapsed = lo > hi
        if bool(collapsed.any()):
            d = torch.ones_like(v) if weights is None else weights
            out = torch.where(collapsed, (d * v).sum(-1, keepdim=True) / d.sum(-1, keepdim=True), out)
        return out
    raise ValueError(f"norm={norm!r} is not valid; allowed: {', '.join(NORMS)}")


def group_extent(W: torch.Tensor, group_size: int, norm: str = "linf") -> torch.Tensor:
    """ρ(W[r, g]) for every row r and group g: (out, n_groups). A last group may be shorter."""
    out, n = W.shape
    full = n // group_size * group_size
    parts = []
    if full:
        V = W[:, :full].reshape(out, full // group_size, group_size)
        parts.append(V.abs().amax(-1) if norm == "linf" else V.amax(-1) - V.amin(-1))
    if full < n:
        blk = W[:, full:]
        parts.append((blk.abs().amax(1) if norm == "linf" else blk.amax(1) - blk.amin(1)).unsqueeze(1))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _group_sums(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Σ_{i∈g} values_i for every input group g (a last group may be shorter): (n_groups,)."""
    return torch.stack([values[g0:g0 + group_size].sum() for g0 in range(0, values.numel(), group_size)])


def group_activation_norms(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """a_g = (Σ_{i∈g} H_ii)^½ for every input group g: (n_groups,)."""
    return _group_sums(torch.diagonal(hessian).float().clamp_min(0), group_size).sqrt()


def group_compensated_costs(hessian: torch.Tensor, group_size: int, damp_percent: float = 0.01,
                            factors: HessianFactors | None = None) -> torch.Tensor:
    """c_g = Σ_{i∈g} 1/[H⁻¹]_ii (H damped like the solver's): (n_groups,)."""
    L, _ = factors_of(hessian, damp_percent, factors).cholesky()
    return _group_sums(1.0 / torch.diagonal(torch.cholesky_inverse(L)), group_size)


def _largest_eigenvalue(H: torch.Tensor, iters: int = 30) -> float:
    """λ_max of a symmetric PSD H by power iteration from a fixed start (deterministic), with a 5 %
    margin so that the step 1/L stays below the stability limit."""
    v = torch.ones(H.shape[0], dtype=H.dtype, device=H.device) / math.sqrt(H.shape[0])
    lam = 0.0
    for _ in range(iters):
        w = H @ v
        n = float(w.norm())
        if n == 0:
            return 0.0
        lam = n
        v = w / n
    return 1.05 * lam


def _predicted_costs(H: torch.Tensor, group_size: int, bits: int, sym: bool, damp_percent: float,
                     factors: HessianFactors | None = None) -> torch.Tensor:
    """The per-group factor of the predicted-error term, c_g/(12·(2^b − 1)²), in units of the
    extent that `group_extent` returns (‖·‖_∞ for symmetric grids, whose ρ = 2·‖·‖_∞: factor 4)."""
    return group_compensated_costs(H, group_size, damp_percent, factors) / (12 * (2**bits - 1) ** 2) * (4.0 if sym else 1.0)


def astro_objective(Wp: torch.Tensor, W: torch.Tensor, hessian: torch.Tensor, beta: float, group_size: int,
                    bits: int, sym: bool = False, penalty: str = "predicted", damp_percent: float = 0.01) -> float:
    """F(W′) of the module docstring (the quantity `astro_reshape` decreases)."""
    norm = "linf" if sym else "range"
    H, W, Wp = hessian.float(), W.float(), Wp.float()
    gs = W.shape[1] if group_size == -1 else group_size
    dW = Wp - W
    rec = float(((dW @ H) * dW).sum())
    if penalty == "paper":
        a = group_activation_norms(H, gs)
        rec0 = float(((W @ H) * W).sum())
        reg0 = float((group_extent(W, gs, norm) * a).sum())
        reg = float((group_extent(Wp, gs, norm) * a).sum())
        return (rec / rec0 if rec0 > 0 else 0.0) + beta * (reg / reg0 if reg0 > 0 else 0.0)
    c = _predicted_costs(H, gs, bits, sym, damp_percent)
    return rec + beta * float((group_extent(Wp, gs, norm).square() * c).sum())


def _penalty_terms(W, H, penalty: str, beta: float, lr: float, lam: float, gs: int, norm: str, bits: int,
                   sym: bool, damp_percent: float, factors: HessianFactors | None = None):
    """(gradient scale, Lipschitz constant L, fixed threshold τ or None, predicted costs c or None) of the
    penalty; None when the paper's relative form is undefined (a zero objective or extent)."""
    out = W.shape[0]
    if penalty == "paper":
        a = group_activation_norms(H, gs)
        rec0 = float(((W @ H) * W).sum())
        reg0 = float((group_extent(W, gs, norm) * a).sum())
        if rec0 <= 0 or reg0 <= 0:
            return None
        grad_scale = 2.0 / rec0
        L = grad_scale * lam / lr
        return grad_scale, L, (beta / reg0 / L) * a.unsqueeze(0).expand(out, a.numel()), None
    grad_scale = 2.0
    return grad_scale, grad_scale * lam / lr, None, _predicted_costs(H, gs, bits, sym, damp_percent, factors)

def astro_reshape(weight: torch.Tensor, hessian: torch.Tensor, *, beta: float = 1.0, steps: int = 25,
                  lr: float = 1.0, group_size: int = 128, bits: int = 4, sym: bool = False,
                  penalty: str = "predicted", damp_percent: float = 0.01,
                  factors: HessianFactors | None = None) -> torch.Tensor:
    """W′ ≈ argmin F(W′) by `steps` FISTA steps from W (module docstring). Returns fp32 (out × in);
    `factors` shares the factorization of `hessian` with the solver (`factors.py`).

    The extent is the grid's own: 2·‖·‖_∞ for `sym`, max − min otherwise."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty={penalty!r} is not valid; allowed: {', '.join(PENALTIES)}")
    norm = "linf" if sym else "range"
    W = weight.float()
    H = hessian.float()
    if beta == 0 or steps == 0:
        return W.clone()
    gs = W.shape[1] if group_size == -1 else group_size
    diag = torch.diagonal(H)
    live = diag > 0
    if not bool(live.any()):
        return W.clone()
    # Jacobi metric: activation scales differ by orders of magnitude across input columns, so plain
    # steps of 1/λ_max crawl along the quiet columns; in the metric diag(H) they all move alike
    d = torch.where(live, diag, diag[live].min())
    r = d.rsqrt()
    lam = _largest_eigenvalue(H * r.unsqueeze(1) * r.unsqueeze(0))
    out, n_in = W.shape
    terms = _penalty_terms(W, H, penalty, beta, lr, lam, gs, norm, bits, sym, damp_percent,
                           factors_of(hessian, damp_percent, factors))
    if terms is None:
        return W.clone()
    grad_scale, L, fixed_tau, c = terms
    full = n_in // gs * gs  # columns in whole groups; a shorter last group is handled on its own
    n_full = full // gs
    d_full = d[:full].reshape(1, n_full, gs).expand(out, n_full, gs)
    d_last = d[full:].unsqueeze(0).expand(out, n_in - full)

    def prox(V: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        parts = []
        if full:
            parts.append(prox_group_extent(V[:, :full].reshape(out, n_full, gs), tau[:, :n_full], norm,
                                           d_full).reshape(out, full))
        if full < n_in:
            parts.append(prox_group_extent(V[:, full:], tau[:, -1], norm, d_last))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    step = 1.0 / (L * d)
    x = W.clone()
    y = W.clone()
    t = 1.0
    for _ in range(steps):
        grad = ((y - W) @ H).mul_(grad_scale)
        tau = fixed_tau if fixed_tau is not None else (2.0 * beta / L) * c.unsqueeze(0) * group_extent(y, gs, norm)
        x_new = prox(y - grad * step, tau)
        x_new[:, ~live] = W[:, ~live]
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x
