"""GPTQ (Frantar et al., 2022) and its asymmetric variants: column-by-column rounding with
optimal error compensation.

Per output row the objective is ‖(Q − W)X‖² = tr((Q − W)·H·(Q − W)ᵀ) with H = 2·X·Xᵀ/N.
With H damped (H + λ·mean(diag H)·I) and U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),
columns are quantized in order (left to right, or by descending diag H with act-order) and for
column i:

    err = (w_i − q_i) / U_ii;     W[:, i+1:] −= err ⊗ U[i, i+1:]

GPTAQ and ResComp (see `gptaq.py`) add a correction term driven by a precomputed strictly upper
triangular matrix P; in the general form the sweep runs

    W[:, i+1:] −= e_i ⊗ U[i, i+1:] − v_i ⊗ P[i, i+1:]

with (e_i, v_i) = ((w_i − q_i)/U_ii, w_i) for GPTAQ and, for ResComp,
e_i = (w_i − q_i + α·(W0_i − w_i))/U_ii with v_i = W0_i (the original column; its P-term is then
known up front and applied before the sweep). With `clamp`, the w_i inside the correction terms
is first clamped to the range its group's grid can represent.

Lazy batches: the update above is applied inside a block of B columns at once, and to the
columns right of the block once per block: W[:, i2:] −= E·U[i1:i2, i2:] − V·P[i1:i2, i2:].

Groups: a group's scale/zero are fitted when its first column is reached, on the *updated*
weights of its columns (the pending lazy-batch update is applied to the columns outside the
current block before fitting, so the result does not depend on the batch width). With act-order
the groups are contiguous in processing order and ``g_idx`` maps each original column to its
group. With static groups every group is fitted up front on the original weights, on contiguous
original columns, whatever the processing order.

Bounded search (`beam_width` K, see `beam.py`): each output row keeps K partial solutions,
each with its own compensated weights; every grid level is a candidate for every beam, scored by
the exact increment of the objective, (w_i − level)²/U_ii², and the K best survive. K = 1 is the
greedy sweep above. The search needs grids fixed up front, so it fits every group statically.

Dead inputs (diag H = 0: the column never sees a non-zero activation) get H_ii = 1 and w = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .beam import beam_step
from .factors import HessianFactors, factors_of
from ..gguf.grid import GGUFGrid, fit_gguf_grid
from ..gguf.grid import dequantize as gguf_dequantize
from ..gguf.types import TENSOR_TYPES
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
    gguf: "GGUFGrid | None" = None  # the GGUF grid the codes lie on (then `weight` is its exact decode)
    # fp32 (out, in): x − q, where x (in levels) is the value the greedy sweep rounded to the code q,
    # clamped to [−½, ½]; how near each decision was (kept for refine_rounding_lr, else None)
    rounding_error: torch.Tensor | None = None


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer error tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)."""
    W = weight.float()
    dW = quantized.float() - W
    num = ((dW @ hessian) * dW).sum()
    den = ((W @ hessian) * W).sum()
    return float(num / den) if den > 0 else float(num)


def damped_cholesky(H: torch.Tensor, damp_percent: float, max_escalations: int = 4):
    """L (lower) with L·Lᵀ = H + λ·mean(diag H)·I; escalates λ ×10 while H stays singular."""
    damp = damp_percent
    for _ in range(max_escalations + 1):
        Hd = H.float().clone()
        Hd.diagonal().add_(damp * Hd.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            return L, damp
        damp *= 10
    raise ValueError(
        f"Hessian is not positive definite even with damp_percent={damp / 10:g} "
        f"(started at {damp_percent:g}); the layer's calibration inputs are degenerate or non-finite"
    )


def damped_inverse_cholesky(H: torch.Tensor | Callable[[], torch.Tensor], damp_percent: float,
                            max_escalations: int = 4):
    """U (upper) with UᵀU = (H + λ·mean(diag H)·I)⁻¹; escalates λ ×10 while H stays singular.

    `H` may be a function that returns a fresh fp32 copy of the Hessian to factor in place: each
    attempt then holds at most three in×in matrices (the caller's Hessian, and two of the copy, L,
    H⁻¹, U in turn), which is what bounds the memory of a large layer's solve."""
    build = H if callable(H) else H.clone
    damp = damp_percent
    for _ in range(max_escalations + 1):
        Hd = build()
        diag0 = torch.diag(Hd).clone()
        Hd.diagonal().copy_(diag0 + damp * diag0.mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
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
    dxxt: torch.Tensor | None = None,
    alpha: float = 0.25,
    residual: bool = False,
    clamp: bool = True,
    beam_width: int | None = None,
    tensor_type: str | None = None,
    factors: HessianFactors | None = None,
    keep_rounding_error: bool = False,
) -> LayerQuantResult:
    """Quantize `weight` (out × in) against the Hessian `hessian` (in × in).

    Plain GPTQ by default. With `dxxt` (D = 2·ΔX·Xᵀ/N) the sweep carries GPTAQ's P-term with step
    scale `alpha`; `residual=True` adds ResComp's compensation-aware residual (without `dxxt`,
    X̃ = X: ResComp on plain GPTQ, the pull toward the original weights alone).
    `beam_width` K runs the bounded search with K partial solutions per row (K = 1 reproduces the
    greedy sweep with static grids); None is the greedy sweep.
    `tensor_type` (a GGUF type) replaces bits, group_size and sym by its grid, fitted up front (`gguf/grid.py`,
    `mse` its search, weighted by diag H); the returned weight is then that grid's exact decode of the codes.
    `factors` shares the factorization of `hessian` with other solves of the same Hessian (`factors.py`).
    `keep_rounding_error` (greedy sweep only) returns each code's rounding error (`LayerQuantResult`)."""
    from .gptaq import gptaq_p_matrix  # the asymmetric correction; imported here to keep one direction

    rows, cols = weight.shape
    _check_solve_inputs(weight, hessian, beam_width)
    bits, gs, n_groups = _grid_layout(cols, group_size, bits, tensor_type)
    static_groups = static_groups or beam_width is not None or tensor_type is not None

    # Factor first: the factorization's in×in matrices are the memory peak; W and D are copied after.
    dead, perm, U, damp_used = factors_of(hessian, damp_percent, factors).sweep(desc_act)
    perm_list = perm.tolist()
    W, D = _dead_columns_zeroed(weight, dxxt, dead)
    gguf, scales, zeros = _initial_grids(W, hessian, gs, n_groups, bits, sym, mse, static_groups, tensor_type)
    if desc_act:
        W, D = W[:, perm], (D[perm][:, perm] if D is not None else None)
    P, D = (gptaq_p_matrix(D, U, alpha) if D is not None else None), None
    # Work on Wᵀ (in × out): a column of W is then a contiguous row, and the rank-1 updates of
    # the inner loop run on contiguous memory (about 2.5× faster on CPU than on W's columns).
    Wt, W = W.t().contiguous(), None
    Wt, W0t, P = _with_residual(Wt, P, residual)
    groups_of = [(perm_list[p] // gs) if static_groups else (p // gs) for p in range(cols)]
    sw = _Sweep(U, P, W0t, scales, zeros, groups_of, bits, sym, mse, gs, static_groups, alpha, clamp, block_size,
                beam_width, fractional_zero=gguf is not None,
                rounding_error=torch.zeros_like(Wt) if keep_rounding_error and beam_width is None else None)
    del U, P, W0t
    Wt, codes_t = (_greedy_sweep if beam_width is None else _beam_sweep)(Wt, sw)
    errors_t, sw = sw.rounding_error, None  # U, P, W0ᵀ go before the outputs are assembled: the next memory peak
    return _in_original_order(Wt, codes_t, perm, groups_of, scales, zeros, damp_used, gguf, errors_t)


def _grid_layout(cols: int, group_size: int, bits: int, tensor_type: str | None):
    """(bits, columns per group, groups): a GGUF type's own, else the options'."""
    if tensor_type is not None:
        spec = TENSOR_TYPES[tensor_type]
        return spec.bits, spec.sub, cols // spec.sub
    gs = cols if group_size == -1 else group_size
    return bits, gs, math.ceil(cols / gs)


def _initial_grids(W, hessian, gs, n_groups, bits, sym, mse, static_groups, tensor_type):
    """(GGUF grid or None, scales, zeros) before the sweep. Static grids (and a GGUF type's) are fitted
    on the original weights; the others are zeros the sweep fills in as it reaches each group."""
    if tensor_type is not None:
        gguf = fit_gguf_grid(W, tensor_type, search=mse, importance=torch.diag(hessian))
        return gguf, gguf.a, gguf.sweep_zero
    if static_groups:
        return None, *fit_groups(W, gs, bits, sym, mse=mse)
    rows = W.shape[0]
    return None, torch.zeros(n_groups, rows, device=W.device), torch.zeros(n_groups, rows, device=W.device)


def _check_solve_inputs(weight: torch.Tensor, hessian: torch.Tensor, beam_width) -> None:
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight shape {tuple(weight.shape)}")
    if beam_width is not None and (isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1):
        raise ValueError(f"beam_width={beam_width!r} is not valid; allowed: an integer >= 1")


def _with_residual(Wt: torch.Tensor, P: torch.Tensor | None, residual: bool):
    """(Wᵀ to sweep, ResComp's original columns W0ᵀ or None, the P the sweep still applies).

    ResComp's P-term is driven by the original columns: known up front, so it is applied here (P
    is strictly upper triangular: column j only receives terms of columns before it)."""
    if not residual:
        return Wt, None, P
    W0t = Wt.clone()
    if P is not None:
        Wt.addmm_(P.t(), W0t)
    return Wt, W0t, None

def _factor_in_sweep_order(hessian: torch.Tensor, desc_act: bool, damp_percent: float):
    """(dead columns, the sweep's column order, U = the damped upper Cholesky factor of H⁻¹ in that
    order, the damping used). A column no input reaches gets unit curvature (its weight is zeroed)."""
    cols = hessian.shape[0]
    diag = torch.diag(hessian).float()
    dead = diag == 0
    diag = diag.masked_fill(dead, 1)
    perm = torch.argsort(diag, descending=True) if desc_act else torch.arange(cols, device=hessian.device)

    def working_hessian() -> torch.Tensor:
        """A fresh fp32 copy of H with dead columns fixed, in the sweep's column order."""
        if desc_act:
            Hc, dead_p = hessian.detach().float()[perm][:, perm], dead[perm]
        else:
            Hc, dead_p = hessian.detach().float().clone(), dead
        Hc[dead_p, dead_p] = 1
        return Hc

    U, damp_used = damped_inverse_cholesky(working_hessian, damp_percent)
    return dead, perm, U, damp_used


def _dead_columns_zeroed(weight: torch.Tensor, dxxt: torch.Tensor | None, dead: torch.Tensor):
    """fp32 copies of W and D (or None) with the dead columns (and D's dead rows) zeroed."""
    W = weight.detach().float().clone()
    W[:, dead] = 0
    D = None
    if dxxt is not None:
        D = dxxt.detach().float().clone()
        D[:, dead] = 0
        D[dead, :] = 0
    return W, D

def _in_original_order(Wt, codes_t, perm, groups_of, scales, zeros, damp_used, gguf=None,
                       rounding_error_t=None) -> LayerQuantResult:
    """The result, with the columns of the sweep's order (`perm`) put back in the weight's own; on a
    GGUF grid its weight is the grid's exact decode of the codes."""
    g_idx_perm = torch.tensor(groups_of, dtype=torch.int32)
    Q = Wt.t()  # every column now holds its de-quantized value ŵ
    codes = codes_t.t()
    inv = torch.argsort(perm)
    g_idx = g_idx_perm[inv.cpu()]
    codes = codes[:, inv].to(torch.int32)
    return LayerQuantResult(
        codes=codes,
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
        weight=Q[:, inv] if gguf is None else gguf_dequantize(codes, gguf),
        damp_percent=damp_used,
        gguf=gguf,
        rounding_error=None if rounding_error_t is None else rounding_error_t.t()[:, inv],
    )


def _grid_range(s, z, maxq):
    """The de-quantized values of levels 0 and maxq: the range the grid can represent (a GGUF
    grid's step may be negative: the ends are then swapped)."""
    lo, hi = (0 - z) * s, (maxq - z) * s
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


@dataclass
class _Sweep:
    """What a column sweep reads besides Wᵀ: the inverse-Hessian factor U, GPTAQ's P (or None), ResComp's
    original columns W0ᵀ (or None), the grids (filled in as it goes unless static), each processed
    column's group, and the grid and step options."""

    U: torch.Tensor
    P: torch.Tensor | None
    W0t: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor
    groups_of: list[int]
    bits: int
    sym: bool
    mse: bool
    gs: int
    static_groups: bool
    alpha: float
    clamp: bool
    block_size: int
    beam_width: int | None
    fractional_zero: bool = False  # a GGUF grid's zero point z + b/a: round after adding it
    rounding_error: torch.Tensor | None = None  # (in, out), filled in by the greedy sweep when given


def _greedy_sweep(Wt, sw: _Sweep):
    U, P, W0t, scales, zeros, groups_of = sw.U, sw.P, sw.W0t, sw.scales, sw.zeros, sw.groups_of
    bits, sym, mse, gs, static_groups, alpha, clamp, block_size = (sw.bits, sw.sym, sw.mse, sw.gs, sw.static_groups,
                                                                    sw.alpha, sw.clamp, sw.block_size)
    cols = Wt.shape[0]
    codes_t = torch.zeros_like(Wt)
    maxq = 2**bits - 1
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1, V1, U1, P1, diag = _block_buffers(W1, U, P, i1, i2)
        for i in range(i2 - i1):
            p = i1 + i
            g = groups_of[p]
            if not static_groups and p % gs == 0:
                stop = min(p + gs, cols)
                current = W1[i:min(stop, i2) - i1]
                if stop > i2:  # the group reaches past this lazy block: bring those columns up to date
                    rest = Wt[i2:stop] - U[i1:p, i2:stop].t() @ Err1[:i]
                    if P is not None:
                        rest += P[i1:p, i2:stop].t() @ V1[:i]
                    current = torch.cat([current, rest], dim=0)
                scales[g], zeros[g] = fit_grid(current.t(), bits, sym, mse=mse)
            s, z = scales[g], zeros[g]
            w = W1[i]
            # q = clamp(round(w/s) + z, 0, maxq), ŵ = (q − z)·s: the grid of grid.py, in place
            q = (torch.round(w / s + z) if sw.fractional_zero else torch.round(w / s).add_(z)).clamp_(0, maxq)
            codes_t[p] = q
            if sw.rounding_error is not None:
                torch.clamp(w / s + z - q, -0.5, 0.5, out=sw.rounding_error[p])
            dq = q.sub_(z).mul_(s)
            _column_step(W1[i + 1:], Err1[i], V1[i] if V1 is not None else None, U1[i, i + 1:],
                         P1[i, i + 1:] if P1 is not None else None, W0t[p] if W0t is not None else None,
                         w, dq, s, z, maxq, alpha, clamp, diag[i])
            W1[i] = dq
        Wt[i1:i2] = W1
        _block_step(Wt[i2:], U, P, Err1, V1, i1, i2)
    return Wt, codes_t


def _block_buffers(W1, U, P, i1, i2):
    """For the lazy block of columns i1:i2 (W1 its weights): the error (and GPTAQ v) buffers, its
    slices of U and P, and U's diagonal."""
    V1 = torch.zeros_like(W1) if P is not None else None
    P1 = P[i1:i2, i1:i2] if P is not None else None
    U1 = U[i1:i2, i1:i2]
    return torch.zeros_like(W1), V1, U1, P1, torch.diag(U1).tolist()


def _column_step(rest, err, v, u_row, p_row, w0, w, dq, s, z, maxq, alpha, clamp, d):
    """Record column i's error in `err` (and GPTAQ's v_i in `v`) and spread them over `rest`, the
    lazy block's columns after i (u_row = U[i, i+1:], p_row = P[i, i+1:] within the block)."""
    torch.sub(w, dq, out=err)
    if p_row is not None or w0 is not None:
        c = torch.clamp(w, *_grid_range(s, z, maxq)) if clamp else w
        if w0 is not None:  # ResComp: pull α·(W0_i − w_i) back toward the original weight
            err.add_(w0 - c, alpha=alpha)
        else:
            v.copy_(c)
            rest.addr_(p_row, c)
    err.div_(d)
    rest.addr_(u_row, err, alpha=-1)


def _block_step(right, U, P, Err1, V1, i1, i2):
    """The lazy-batch update of `right`, the columns i2: right of the block: W[:, i2:] −= E·U − V·P."""
    right.addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    if P is not None:
        right.addmm_(P[i1:i2, i2:].t(), V1)


def _beam_sweep(Wt, sw: _Sweep):
    """The sweep with K partial solutions per row, laid out as K adjacent columns of Wᵀ per row.

    Each step re-orders the beams (`src`: the parent of every new beam). Only what later steps read
    is re-ordered at once: the lazy block's columns still to come, and at a block's end the columns
    right of it. The error and v rows of finished columns, and the chosen levels, are kept in the
    beam order of their own step and aligned by walking the parents back (a block's end, the end)."""
    U, P, W0t, scales, zeros, groups_of = sw.U, sw.P, sw.W0t, sw.scales, sw.zeros, sw.groups_of
    bits, alpha, clamp, block_size, K = sw.bits, sw.alpha, sw.clamp, sw.block_size, sw.beam_width
    cols, rows = Wt.shape
    n = rows * K
    maxq = 2**bits - 1
    Wt = Wt.repeat_interleave(K, dim=1)  # from here on: the columns not yet reached, in beam order
    sK, zK = scales.repeat_interleave(K, dim=1), zeros.repeat_interleave(K, dim=1)
    W0K = W0t.repeat_interleave(K, dim=1) if W0t is not None else None  # the same in every beam
    cost = torch.full((rows, K), float("inf"), device=Wt.device)
    cost[:, 0] = 0  # the K beams start as one solution
    # per column, each beam's level and parent: a byte and an int32 per weight and beam (bits ≤ 8)
    levels = torch.empty(cols, n, dtype=torch.uint8, device=Wt.device)
    parents = torch.empty(cols, n, dtype=torch.int32, device=Wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        rest = Wt[: i2 - i1]  # the block's columns from the current one on (a view until re-ordered)
        Err1, V1, U1, P1, diag = _block_buffers(rest, U, P, i1, i2)
        for i in range(i2 - i1):
            p = i1 + i
            s, z = sK[groups_of[p]], zK[groups_of[p]]
            cost, src, q = beam_step(rest[0], s, z, maxq, diag[i], cost, fractional_zero=sw.fractional_zero)
            parents[p] = src
            levels[p] = q
            rest = rest.index_select(1, src)  # (3× faster than rest[:, src] on CPU)
            w = rest[0]
            dq = (q - z).mul_(s)
            _column_step(rest[1:], Err1[i], V1[i] if V1 is not None else None, U1[i, i + 1:],
                         P1[i, i + 1:] if P1 is not None else None, W0K[p] if W0K is not None else None,
                         w, dq, s, z, maxq, alpha, clamp, diag[i])
            rest = rest[1:]
        # align the block's error (and v) rows with the beams as they are now, then update the rest
        beam = torch.arange(n, device=Wt.device)
        for i in range(i2 - i1 - 1, -1, -1):
            Err1[i] = Err1[i, beam]
            if V1 is not None:
                V1[i] = V1[i, beam]
            beam = parents[i1 + i, beam]
        Wt = Wt[i2 - i1:].index_select(1, beam)
        _block_step(Wt, U, P, Err1, V1, i1, i2)
    # the best beam of every row, followed back to the first column
    beam = cost.argmin(dim=1) + torch.arange(rows, device=cost.device) * K
    codes_t = torch.empty(cols, rows, device=cost.device)
    for p in range(cols - 1, -1, -1):
        codes_t[p] = levels[p, beam]
        beam = parents[p, beam]
    g = torch.tensor(groups_of, device=codes_t.device)
    dq_t = (codes_t - zeros[g]).mul_(scales[g])  # (cols, rows) in processing order
    return dq_t, codes_t
