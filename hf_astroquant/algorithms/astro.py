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
On SmolLM2-135M layers at 3 bits g64 it never lowered the solved layer's error below plain
GPTQ's with the same grid options (`benchmarks/bench_astro_layers.py`); the predicted-error form
did, so it is the default.

The smooth term has gradient 2·(W′ − W)·H and Lipschitz constant L = 2·λ_max(H); FISTA takes
`steps` steps of size lr / L, each followed by the proximal map of the group term, exact and
separable per (row, group):

    prox of τ·‖v‖_∞ :  v − Π_{‖u‖₁ ≤ τ}(v)  (Moreau), i.e. |v| clipped at the level t ≥ 0 with
                       Σ (|v_i| − t)_+ = τ, signs kept;
    prox of τ·(max v − min v) :  v clipped from above at t_hi with Σ (v_i − t_hi)_+ = τ and from
                       below at t_lo with Σ (t_lo − v_i)_+ = τ; when t_lo > t_hi the whole group
                       becomes its mean (the range's subdifferential at a constant vector is
                       {u : Σu = 0, ‖u‖₁ ≤ 2}).

For the squared extent the step uses τ = η·β·c_g·2·ρ(y) at the current point y: a fixed point of
that iteration satisfies 0 ∈ ∇(first term) + β·c_g·∂(ρ²), the exact optimality condition.
Dead input columns (H_ii = 0) are left as they are: the solver zeroes them anyway.
"""

from __future__ import annotations

import math

import torch

NORMS = ("linf", "range")
PENALTIES = ("predicted", "paper")


def water_level(values: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per row of `values` (..., n): the level t with Σ_i (values_i − t)_+ = budget (budget ≥ 0)."""
    return _level_of_sorted(values.sort(dim=-1, descending=True)[0], budget)


def _level_of_sorted(s: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """`water_level` of rows already sorted in descending order.

    The top k sorted values s_1 ≥ … ≥ s_k are the ones above t, t = (Σ_{i≤k} s_i − budget)/k,
    and k is the largest index with s_k > t_k (the condition holds for a prefix of k)."""
    k = torch.arange(1, s.shape[-1] + 1, device=s.device, dtype=s.dtype)
    levels = (s.cumsum(-1) - budget.unsqueeze(-1)) / k
    count = (s > levels).sum(-1, keepdim=True).clamp_min(1)
    return levels.gather(-1, count - 1).squeeze(-1)


def prox_group_extent(v: torch.Tensor, tau: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """The proximal map of τ·ρ(v) for each row of v (..., n), τ (...) ≥ 0; ρ = ‖·‖_∞ or max − min."""
    if norm == "linf":
        t = water_level(v.abs(), tau).clamp_min(0)
        return v.sign() * torch.minimum(v.abs(), t.unsqueeze(-1))
    if norm == "range":
        # one sort serves both ends: −v sorted descending is v's order reversed and negated (the
        # solver's hot loop: one sort instead of two)
        s, _ = v.sort(dim=-1, descending=True)
        hi = _level_of_sorted(s, tau).unsqueeze(-1)
        lo = -_level_of_sorted(-s.flip(-1), tau).unsqueeze(-1)
        out = torch.minimum(torch.maximum(v, lo), hi)
        collapsed = lo > hi
        if bool(collapsed.any()):
            out = torch.where(collapsed, v.mean(-1, keepdim=True), out)
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


def group_activation_norms(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """a_g = (Σ_{i∈g} H_ii)^½ for every input group g: (n_groups,)."""
    d = torch.diagonal(hessian).float().clamp_min(0)
    return torch.stack([d[g0:g0 + group_size].sum().sqrt() for g0 in range(0, d.numel(), group_size)])


def group_compensated_costs(hessian: torch.Tensor, group_size: int, damp_percent: float = 0.01) -> torch.Tensor:
    """c_g = Σ_{i∈g} 1/[H⁻¹]_ii (H damped like the solver's): (n_groups,)."""
    from .gptq import damped_cholesky

    L, _ = damped_cholesky(hessian, damp_percent)
    c = 1.0 / torch.diagonal(torch.cholesky_inverse(L))
    return torch.stack([c[g0:g0 + group_size].sum() for g0 in range(0, c.numel(), group_size)])


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


def _predicted_costs(H: torch.Tensor, group_size: int, bits: int, sym: bool, damp_percent: float) -> torch.Tensor:
    """The per-group factor of the predicted-error term, c_g/(12·(2^b − 1)²), in units of the
    extent that `group_extent` returns (‖·‖_∞ for symmetric grids, whose ρ = 2·‖·‖_∞: factor 4)."""
    return group_compensated_costs(H, group_size, damp_percent) / (12 * (2**bits - 1) ** 2) * (4.0 if sym else 1.0)


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


def astro_reshape(weight: torch.Tensor, hessian: torch.Tensor, *, beta: float = 1.0, steps: int = 50,
                  lr: float = 1.0, group_size: int = 128, bits: int = 4, sym: bool = False,
                  penalty: str = "predicted", damp_percent: float = 0.01) -> torch.Tensor:
    """W′ ≈ argmin F(W′) by `steps` FISTA steps from W (module docstring). Returns fp32 (out × in).

    The extent is the grid's own: 2·‖·‖_∞ for `sym`, max − min otherwise."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty={penalty!r} is not valid; allowed: {', '.join(PENALTIES)}")
    norm = "linf" if sym else "range"
    W = weight.float()
    H = hessian.float()
    if beta == 0 or steps == 0:
        return W.clone()
    gs = W.shape[1] if group_size == -1 else group_size
    live = torch.diagonal(H) > 0
    lam = _largest_eigenvalue(H)
    if lam <= 0:
        return W.clone()
    out, n_in = W.shape
    if penalty == "paper":
        a = group_activation_norms(H, gs)
        rec0 = float(((W @ H) * W).sum())
        reg0 = float((group_extent(W, gs, norm) * a).sum())
        if rec0 <= 0 or reg0 <= 0:
            return W.clone()
        grad_scale, eta = 2.0 / rec0, lr * rec0 / (2.0 * lam)
        fixed_tau = (eta * beta / reg0) * a.unsqueeze(0).expand(out, a.numel())
    else:
        c = _predicted_costs(H, gs, bits, sym, damp_percent)
        grad_scale, eta = 2.0, lr / (2.0 * lam)
        fixed_tau = None
    full = n_in // gs * gs  # columns in whole groups; a shorter last group is handled on its own

    def prox(V: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        parts = []
        if full:
            n = full // gs
            parts.append(prox_group_extent(V[:, :full].reshape(out, n, gs), tau[:, :n], norm).reshape(out, full))
        if full < n_in:
            parts.append(prox_group_extent(V[:, full:], tau[:, -1], norm))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    x = W.clone()
    y = W.clone()
    t = 1.0
    for _ in range(steps):
        grad = ((y - W) @ H).mul_(grad_scale)
        tau = fixed_tau if fixed_tau is not None else (2.0 * eta * beta) * c.unsqueeze(0) * group_extent(y, gs, norm)
        x_new = prox(y - eta * grad, tau)
        x_new[:, ~live] = W[:, ~live]
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x
