"""Uniform per-row quantization grids.

For a group of weights w (one row of one group), with maxq = 2^b − 1:

    asymmetric: s = (max(w, 0) − min(w, 0)) / maxq,   z = round(−min(w, 0) / s)
    symmetric:  s = 2·max|w| / maxq,                   z = 2^(b−1)
    q = clamp(round(w / s) + z, 0, maxq),              ŵ = (q − z) · s

The scale is rounded to fp16 before z and q are computed, because fp16 is how the scale is
stored: the solver then compensates the error of exactly the weights the packed model uses.

`mse=True` is GPTQ's grid search: shrink the range by p ∈ {1, 1 − 1/grid, …, 1 − maxshrink}
and keep, per row, the p with the smallest Σ|w − ŵ|^norm (searched coarse to fine).
"""

from __future__ import annotations

import torch

# Smallest positive fp16 subnormal: a scale must stay representable after the fp16 round trip.
FP16_TINY = 2.0**-24


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=FP16_TINY).to(torch.float16).to(torch.float32).clamp(min=FP16_TINY)


def _grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    maxq = 2**bits - 1
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _round_scale(2 * amax / maxq)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = _round_scale((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _shrink_error(w, xmin, xmax, p, bits, sym, norm):
    """Σ|w − ŵ|^norm per row for the range shrunk by `p` (shape (candidates, ..., rows) or
    broadcastable to it); returns (errors, scales, zeros), each (candidates, ..., rows)."""
    s, z = _grid_from_range(p * xmin, p * xmax, bits, sym)
    S, Z = s[..., None], z[..., None]
    err = torch.div(w, S)  # in place from here on: this tensor is the big one
    err.round_().add_(Z).clamp_(0, 2**bits - 1).sub_(Z).mul_(S).sub_(w)
    return err.abs_().pow_(norm).sum(dim=-1), s, z


def fit_grid(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for `w` of shape (..., rows, cols); both fp32 of shape (..., rows).

    With `mse`, the shrink factor is searched coarse to fine: every 5th point of GPTQ's grid
    {1, 1 − 1/grid, …, 1 − maxshrink}, then the 4 grid points either side of each row's best.
    """
    w = w.float()
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    scale, zero = _grid_from_range(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    step = 5
    coarse = 1 - torch.arange(0, int(maxshrink * grid) + 1, step, device=w.device, dtype=torch.float32) / grid
    chunk = max(1, (1 << 24) // max(1, w.numel()))
    as_candidates = (-1,) + (1,) * xmin.dim()
    errs = torch.cat([_shrink_error(w, xmin, xmax, coarse[i:i + chunk].view(as_candidates), bits, sym, norm)[0]
                      for i in range(0, len(coarse), chunk)])
    best_p = coarse[errs.argmin(dim=0)]  # (..., rows)
    best = torch.full_like(scale, float("inf"))
    for k in range(-(step - 1), step):
        p = (best_p - k / grid).clamp(min=1 - maxshrink, max=1.0)
        err, s, z = (t[0] for t in _shrink_error(w, xmin, xmax, p[None], bits, sym, norm))
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def fit_groups(w: torch.Tensor, group_size: int, bits: int, sym: bool, mse: bool = False):
    """(scales, zeros) of shape (n_groups, rows) for contiguous column groups of `w` (rows, cols);
    a last group shorter than `group_size` gets its own grid."""
    rows, cols = w.shape
    full = cols // group_size
    scales, zeros = [], []
    if full:
        blocks = w[:, :full * group_size].reshape(rows, full, group_size).transpose(0, 1)
        s, z = fit_grid(blocks, bits, sym, mse=mse)
        scales.append(s)
        zeros.append(z)
    if cols % group_size:
        s, z = fit_grid(w[:, full * group_size:], bits, sym, mse=mse)
        scales.append(s[None])
        zeros.append(z[None])
    return torch.cat(scales), torch.cat(zeros)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w/s) + z, 0, 2^b − 1), as fp32 holding integers."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """ŵ = (q − z)·s."""
    return (q - zero) * scale
