"""Zero-cost transforms: the math of the rotations and scales that fold into a model's weights.

Orthogonal rotation of a stream h (row vectors): h′ = h·Q with QᵀQ = I. A Linear reading it
(y = h·Wᵀ) keeps its output with W′ = W·Q; a Linear writing it (h = z·Wᵀ + b) produces the
rotated stream with W′ = Qᵀ·W, b′ = b·Q. RMSNorm commutes with Q only without its weight γ
(‖h·Q‖ = ‖h‖), so γ is first folded into the Linears that read the norm: W′ = W·diag(γ), γ′ = 1.

Per-channel scales s > 0 on a stream x feeding Linears W: W′ = W·diag(s) and the producer of x
divides channel i by s_i (a norm's γ_i, or row i of the Linear that writes x when nothing
non-linear sits between). The scales are searched as in AWQ, s = d^α / (max d^α · min d^α)^½
with d_i the RMS of input channel i (√(H_ii/2)), α on a grid in [0, 1] (α = 0 is s = 1), each α
scored by the output error of round-to-nearest of W·diag(s), measured with H:
tr((Q(W·S)·S⁻¹ − W)·H·(…)ᵀ).

Adaptive choice: the excess kurtosis of a Linear's weights, k = E[(w − μ)⁴]/σ⁴ − 3, across the
layers of one kind, as a robust z-score z = (k − median)/(1.4826·MAD) (see `robust_z`).
"""

from __future__ import annotations

import math

import torch

from .rtn import rtn_quantize


def hadamard(n: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order n (a power of two), fp64: H·Hᵀ = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix of order n (QR of a Gaussian, signs fixed), fp64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """The rotation used for a stream of width n: a randomized Hadamard matrix diag(±1)·H when n is
    a power of two (its rows spread every channel evenly over all others), else a random
    orthogonal matrix. Returns (Q fp64, its kind)."""
    if n & (n - 1) == 0:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return signs.unsqueeze(1) * hadamard(n), "hadamard"
    return random_orthogonal(n, seed), "random_orthogonal"


def fixing_the_mean(q: torch.Tensor) -> torch.Tensor:
    """An orthogonal Q′ = Q·(I − 2·w·wᵀ) with Q′·1 = 1, so h·Q′ keeps the mean of every row h.

    A LayerNorm centres its input; it commutes with a rotation only if the rotation maps the
    all-ones direction u = 1/√n to itself: then (h·Q′ − μ·1ᵀ) = (h − μ·1ᵀ)·Q′. The Householder
    reflection with w = (u − v)/‖u − v‖, v = Qᵀ·u, maps u to v, so Q′·u = Q·v = u; Q′ keeps every
    other direction as spread as Q does (one reflection). fp64 in, fp64 out."""
    n = q.shape[0]
    u = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
    v = q.t() @ u
    d = u - v
    if float(d.norm()) < 1e-12:
        return q.clone()
    w = d / d.norm()
    return q - 2 * torch.outer(q @ w, w)


def mean_keeping_rotation(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """The rotation for a stream read by LayerNorms: `fixing_the_mean` of rotation(n)·diag(±1).

    The randomized Hadamard matrix maps the all-ones direction onto a single axis, so the reflection
    that brings it back would concentrate one row (max |q| ≈ 3.5/√n at n = 2048); random column signs
    first make its image dense, and the result stays near the Hadamard's spread (≈ 1.5/√n to 2.4/√n)."""
    q, kind = rotation(n, seed)
    g = torch.Generator().manual_seed(seed + 7919)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return fixing_the_mean(q * signs.unsqueeze(0)), f"{kind} keeping the mean"


def excess_kurtosis(weight: torch.Tensor) -> float:
    """E[(w − μ)⁴]/σ⁴ − 3 over all entries (0 for a Gaussian, large for heavy tails)."""
    w = weight.detach().double().flatten()
    c = w - w.mean()
    var = c.square().mean()
    if var == 0:
        return 0.0
    return float(c.pow(4).mean() / var.square() - 3)


def robust_z(values: list[float]) -> list[float]:
    """(v − median)/(1.4826·MAD) for each value. When more than half the values are equal the MAD
    is 0; the mean absolute deviation stands in (scaled by 1.2533, its Gaussian factor), so a lone
    outlier among equal values still stands out; all zeros when every value is equal."""
    if not values:
        return []
    t = torch.tensor(values, dtype=torch.float64)
    med = t.median()
    dev = (t - med).abs()
    spread = 1.4826 * dev.median()
    if spread == 0:
        spread = 1.2533 * dev.mean()
    if spread == 0:
        return [0.0] * len(values)
    return ((t - med) / spread).tolist()


def scaled_rtn_error(weights: list[torch.Tensor], hessian: torch.Tensor, s: torch.Tensor, bits: int,
                     group_size: int, sym: bool) -> float:
    """Σ_W tr((Q(W·S)·S⁻¹ − W)·H·(…)ᵀ) with Q round-to-nearest: the error a scale vector leaves."""
    H = hessian.float()
    total = 0.0
    for W in weights:
        W = W.float()
        q = rtn_quantize(W * s, bits=bits, group_size=group_size, sym=sym).weight / s
        d = q - W
        total += float(((d @ H) * d).sum())
    return total


def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                  grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """AWQ-style per-input-channel scales for the Linears `weights` (sharing one input with
    statistics `hessian`). Returns (s fp32, the chosen α, error ratio against s = 1)."""
    d = (torch.diagonal(hessian).float().clamp_min(0) / 2).sqrt()
    live = d > 0
    if not live.any():
        return torch.ones_like(d), 0.0, 1.0
    d = torch.where(live, d, d[live].min())
    base = scaled_rtn_error(weights, hessian, torch.ones_like(d), bits, group_size, sym)
    best = (base, 0.0, torch.ones_like(d))
    for k in range(1, grid + 1):
        alpha = k / grid
        s = d.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = scaled_rtn_error(weights, hessian, s, bits, group_size, sym)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], (best[0] / base if base > 0 else 1.0)
