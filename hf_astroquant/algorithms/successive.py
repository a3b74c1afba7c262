"""Successive rounding (SNRQ / CoreQ, arXiv 2602.05902): reverse-order decoding toward a target.

With the damped Hessian factored as H = L·Lᵀ (lower Cholesky of H itself, no inverse), each
row's objective splits exactly as

    tr((q − w_ref)·H·(q − w_ref)ᵀ) = Σ_i L_ii² · (q_i − ŵ_i)²,
    ŵ_i = w_ref,i + Σ_{k>i} (L_ki / L_ii) · (w_ref,k − q_k),

so decoding the columns last to first makes every term depend only on columns already decoded;
greedy q_i = Quant(ŵ_i). Columns are sorted by ascending diag H (the largest decoded first).
The grids are fixed up front (fitted on the target). This is GPTQ's greedy sweep written in
closed form (Babai's nearest plane); the target W_ref carries the asymmetric interpolation.
"""

from __future__ import annotations

import torch

from .factors import HessianFactors, factors_of
from .gptq import LayerQuantResult, damped_cholesky
from ..gguf.grid import dequantize as gguf_dequantize
from ..gguf.grid import fit_gguf_grid
from .grid import fit_groups


def successive_quantize(target: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int = -1,
                        sym: bool = False, damp_percent: float = 0.01, block_size: int = 128,
                        mse: bool = False, tensor_type: str | None = None,
                        factors: HessianFactors | None = None) -> LayerQuantResult:
    """Greedy successive rounding of `target` (out × in) under the Hessian `hessian` (in × in);
    `tensor_type` (a GGUF tensor type) decodes onto that type's grid, fitted on the target; `factors`
    shares the factorization of `hessian` (`factors.py`)."""
    T = target.detach().float().clone()
    rows, cols = T.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight shape {tuple(T.shape)}")
    gs = cols if group_size == -1 else group_size
    dead, order, L, damp_used = factors_of(hessian, damp_percent, factors).ascending_cholesky()
    T[:, dead] = 0
    gguf = None
    if tensor_type is not None:
        gguf = fit_gguf_grid(T, tensor_type, search=mse, importance=torch.diag(hessian).float().masked_fill(dead, 1))
        bits, gs = gguf.spec.bits, gguf.spec.sub
        scales, zeros = gguf.a, gguf.sweep_zero
    else:
        scales, zeros = fit_groups(T, gs, bits, sym, mse=mse)
    g_idx = torch.arange(cols, dtype=torch.int32) // gs

    Tp = T[:, order]
    g = g_idx[order.cpu()].long().to(T.device)
    S, Z = scales[g].t(), zeros[g].t()  # (rows, cols) in decoding order
    maxq = 2**bits - 1
    Q = torch.zeros_like(Tp)  # de-quantized values
    codes = torch.zeros_like(Tp)
    R = torch.zeros_like(Tp)  # w_ref − q of decoded columns
    for j2 in range(cols, 0, -block_size):
        j1 = max(0, j2 - block_size)
        # pull from every decoded column right of this block, then within the block as we go
        acc = R[:, j2:] @ L[j2:, j1:j2] if j2 < cols else torch.zeros(rows, j2 - j1, device=T.device)
        for j in range(j2 - 1, j1 - 1, -1):
            k = j - j1
            what = Tp[:, j] + acc[:, k] / L[j, j]
            q = (torch.round(what / S[:, j] + Z[:, j]) if gguf is not None else
                 torch.round(what / S[:, j]).add_(Z[:, j])).clamp_(0, maxq)
            codes[:, j] = q
            Q[:, j] = (q - Z[:, j]) * S[:, j]
            R[:, j] = Tp[:, j] - Q[:, j]
            if k:
                acc[:, :k].addr_(R[:, j], L[j, j1:j])
    inv = torch.argsort(order)
    codes = codes[:, inv].to(torch.int32)
    weight = Q[:, inv] if gguf is None else gguf_dequantize(codes, gguf)
    return LayerQuantResult(codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx, weight=weight,
                            damp_percent=damp_used, gguf=gguf)


def factor_ascending(hessian: torch.Tensor, damp_percent: float):
    """(dead columns, the decoding order, L, the damping used): L·Lᵀ = H′ + λ·mean(diag H′)·I with
    H′ = H with unit curvature on dead columns, permuted by ascending diag H′ (decoded last to first)."""
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    order = torch.argsort(torch.diag(H))
    L, damp_used = damped_cholesky(H[order][:, order], damp_percent)  # same damping and escalation rule as GPTQ
    return dead, order, L, damp_used


def successive_objective_terms(target: torch.Tensor, quantized: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Σ_i L_ii²·(q_i − ŵ_i)² per row, the split form of tr((Q − T)·H·(Q − T)ᵀ) (for tests)."""
    R = target.double() - quantized.double()
    cols = R.shape[1]
    L = L.double()
    total = torch.zeros(R.shape[0], dtype=torch.float64)
    for i in range(cols):
        what = target[:, i].double() + (R[:, i + 1:] @ L[i + 1:, i]) / L[i, i]
        total += L[i, i] ** 2 * (quantized[:, i].double() - what) ** 2
    return total


__all__ = ["successive_quantize", "successive_objective_terms"]
