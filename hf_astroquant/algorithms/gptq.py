"""GPTQ (Frantar et al., 2022): column-by-column rounding with optimal error compensation.

Per output row the objective is ‖(Q − W)X‖² = tr((Q − W)·H·(Q − W)ᵀ) with H = 2·X·Xᵀ/N.
With H damped (H + λ·mean(diag H)·I) and U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),
columns are quantized in order (left to right, or by descending diag H with act-order) and for
column i:

    err = (w_i − q_i) / U_ii;     W[:, i+1:] −= err ⊗ U[i, i+1:]

Lazy batches: the update above is applied inside a block of B columns at once, and to the
columns right of the block once per block: W[:, i2:] −= Err·U[i1:i2, i2:].

Groups: a group's scale/zero are fitted when its first column is reached, on the *updated*
weights of its columns (the pending lazy-batch update is applied to the columns outside the
current block before fitting, so the result does not depend on the batch width). With act-order
the groups are contiguous in processing order and ``g_idx`` maps each original column to its
group. With static groups every group is fitted up front on the original weights, on contiguous
original columns, whatever the processing order.

Dead inputs (diag H = 0: the column never sees a non-zero activation) get H_ii = 1 and w = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grid import fit_grid, fit_groups


@dataclass
class LayerQuantResult:
    """A quantized Linear weight (out × in) in its unpacked form."""

    codes: torch.Tensor  # int32 (out, in), values in [0, 2^b − 1]
    scales: torch.Tensor  # fp32 (n_groups, out), fp16-representable
    zeros: torch.Tensor  # int32 (n_groups, out)
    g_idx: torch.Tensor  # int32 (in,), group of each input column
    weight: torch.Tensor  # fp32 (out, in): the de-quantized weight (q − z)·s
    damp_percent: float | None = None  # the damping actually used (escalated when H was singular)


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer error tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)."""
    W = weight.float()
    dW = quantized.float() - W
    num = ((dW @ hessian) * dW).sum()
    den = ((W @ hessian) * W).sum()
    return float(num / den) if den > 0 else float(num)


def damped_inverse_cholesky(H: torch.Tensor, damp_percent: float, max_escalations: int = 4):
    """U (upper) with UᵀU = (H + λ·mean(diag H)·I)⁻¹; escalates λ ×10 while H stays singular."""
    mean_diag = torch.diag(H).mean()
    damp = damp_percent
    idx = torch.arange(H.shape[0], device=H.device)
    for _ in range(max_escalations + 1):
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise ValueError(
        f"Hessian is not positive definite even with damp_percent={damp / 10:g} "
        f"(started at {damp_percent:g}); the layer's calibration inputs are degenerate or non-finite"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
) -> LayerQuantResult:
    """Quantize `weight` (out × in) against the Hessian `hessian` (in × in) with GPTQ."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight shape {tuple(W.shape)}")
    gs = cols if group_size == -1 else group_size
    n_groups = math.ceil(cols / gs)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:
        scales, zeros = fit_groups(W, gs, bits, sym, mse=mse)
    else:
        scales = torch.zeros(n_groups, rows, device=W.device)
        zeros = torch.zeros(n_groups, rows, device=W.device)

    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    perm_list = perm.tolist()

    U, damp_used = damped_inverse_cholesky(H, damp_percent)
    del H

    # Work on Wᵀ (in × out): a column of W is then a contiguous row, and the rank-1 updates of
    # the inner loop run on contiguous memory (about 2.5× faster on CPU than on W's columns).
    Wt = W.t().contiguous()
    del W
    codes_t = torch.zeros_like(Wt)
    g_idx_perm = torch.zeros(cols, dtype=torch.int32)
    maxq = 2**bits - 1

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        diag = torch.diag(U1).tolist()
        for i in range(i2 - i1):
            p = i1 + i
            if static_groups:
                g = perm_list[p] // gs
            else:
                g = p // gs
                if p % gs == 0:
                    stop = min(p + gs, cols)
                    current = W1[i:min(stop, i2) - i1]
                    if stop > i2:  # the group reaches past this lazy block: bring those columns up to date
                        rest = Wt[i2:stop] - U[i1:p, i2:stop].t() @ Err1[:i]
                        current = torch.cat([current, rest], dim=0)
                    scales[g], zeros[g] = fit_grid(current.t(), bits, sym, mse=mse)
            s, z = scales[g], zeros[g]
            w = W1[i]
            # q = clamp(round(w/s) + z, 0, maxq), ŵ = (q − z)·s: the grid of grid.py, in place
            q = torch.round(w / s).add_(z).clamp_(0, maxq)
            codes_t[p] = q
            g_idx_perm[p] = g
            dq = q.sub_(z).mul_(s)
            err = Err1[i]
            torch.sub(w, dq, out=err).div_(diag[i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
            W1[i] = dq
        Wt[i1:i2] = W1
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)

    Q = Wt.t()  # every column now holds its de-quantized value ŵ
    codes = codes_t.t()
    inv = torch.argsort(perm)
    g_idx = g_idx_perm[inv.cpu()]
    return LayerQuantResult(
        codes=codes[:, inv].to(torch.int32),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        weight=Q[:, inv],
        damp_percent=damp_used,
    )
