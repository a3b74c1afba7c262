"""The grid of a GGUF tensor type, fitted up front so a solver rounds onto exactly what the file holds.

Every type de-quantizes a sub-block of columns (per output row) as ŵ = a·(q − z) − b
(`types.py`). The fit, per sub-block, then per super-block for the K-quants:

1. A step s (and for the affine types an offset m ≥ 0 where the type stores an unsigned min):
   symmetric types put the largest-magnitude weight x* on the grid's longest side,
   s = x*/(−z) (llama.cpp's choice; s may be negative); affine types span [lo, hi] with
   s = (hi − lo)/maxq, m = −lo. With `search`, shrunk ranges p ∈ {1, …, 0.7} (and for the
   symmetric types the other side, s = x*/(maxq − z)) are tried and the one with the smallest
   Σ_j h_j·(w_j − ŵ_j)² kept (h: the column weights, the Hessian's diagonal when given).
2. Legacy types store s (and m) in fp16: a = fp16(s), b = fp16(m).
   K-quants store them as integers of `scale_bits` bits times one fp16 factor per 256 columns:
   unsigned  d = fp16(max s / (2^k − 1)),  sc = round(s/d),  dmin = fp16(max m / (2^k − 1)),  m' = round(m/dmin)
   signed    d = fp16(−x_s / 2^(k−1)) for x_s the largest-magnitude s,  sc = round(s/d) ∈ [−2^(k−1), 2^(k−1) − 1],
             never 0 (±1 instead: a zero step cannot be solved onto)
   and a = d·sc, b = dmin·m' in fp32 (the order llama.cpp and gguf-py multiply in). With
   `search` each sub-block then tries sc ± 1 (and m' ± 1) and keeps the best.

`dequantize` computes a·(q − z) − b in fp32 in that order: bit for bit what gguf-py decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import TENSOR_TYPES, TensorType

_SHRINK = torch.linspace(1.0, 0.7, 16)


@dataclass
class GGUFGrid:
    """One tensor's grid; per-sub-block tensors are (n_sub, rows) like `grid.fit_groups`' scales."""

    type: str
    a: torch.Tensor  # fp32 step a = d·sc (or the fp16 step)
    b: torch.Tensor  # fp32 offset (0 for the symmetric types)
    d: torch.Tensor  # fp32 holding fp16 values: (n_super, rows) for K-quants, else (n_sub, rows)
    dmin: torch.Tensor | None = None  # K affine: fp16 factor of the mins; legacy affine: the fp16 offsets
    sc: torch.Tensor | None = None  # K-quants: integer sub-block steps (n_sub, rows)
    mins: torch.Tensor | None = None  # K affine: integer sub-block mins (n_sub, rows)

    @property
    def spec(self) -> TensorType:
        return TENSOR_TYPES[self.type]

    @property
    def sweep_zero(self) -> torch.Tensor:
        """z + b/a: the zero point a solver's q = round(w/a + z) uses (fractional for affine types)."""
        return self.spec.zero + self.b / self.a


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _sub_blocks(W: torch.Tensor, sub: int) -> torch.Tensor:
    rows, cols = W.shape
    return W.float().reshape(rows, cols // sub, sub).transpose(0, 1)  # (n_sub, rows, sub)


def _error(X, h, a, b, t: TensorType):
    """Σ h·(x − ŵ)² per sub-block for steps a and offsets b of shape X.shape[:-1]."""
    a, b = a[..., None], b[..., None]
    q = torch.round((X + b) / a + t.zero).clamp_(0, t.maxq)
    return (((q - t.zero) * a - b - X) ** 2 * h).sum(-1)


def _pick(candidates):
    """Per element, the tensors of the candidate [(error, (tensor, ...)), ...] with the smallest error
    (the first on a tie); a None tensor stays None."""
    best_err, best = None, None
    for err, tensors in candidates:
        if best is None:
            best_err, best = err, list(tensors)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = [None if c is None else torch.where(better, c, o) for c, o in zip(tensors, best)]
    return best


def _nonzero(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a == 0, torch.ones_like(a), a)


def _raw_steps(X, h, t: TensorType, search: bool, fp16: bool):
    """Step 1: continuous (s, m) per sub-block, rounded to fp16 where the type stores them so."""
    shrink = _SHRINK if search else _SHRINK[:1]
    r = _fp16 if fp16 else (lambda v: v)
    if not t.affine:
        idx = X.abs().argmax(-1, keepdim=True)
        xmax = X.gather(-1, idx).squeeze(-1)
        zero_b = torch.zeros_like(xmax)
        sides = [-t.zero] + ([t.maxq - t.zero] if search else [])
        cands = [(_nonzero(r(xmax * p / side)), zero_b) for side in sides for p in shrink.tolist()]
    else:
        lo, hi = X.amin(-1), X.amax(-1)
        if t.kquant:  # the stored min is unsigned: the range always includes 0
            lo = lo.clamp(max=0)
        cands = []
        for p in shrink.tolist():
            lo_p, hi_p = ((lo * p, hi * p) if t.kquant else
                          ((lo + hi) / 2 - (hi - lo) / 2 * p, (lo + hi) / 2 + (hi - lo) / 2 * p))
            cands.append((_nonzero(r((hi_p - lo_p) / t.maxq)), r(-lo_p)))
    return _pick((_error(X, h, a, b, t), (a, b)) for a, b in cands)


def _quantize_steps(s, m, t: TensorType):
    """Step 2 for K-quants: (d, sc, dmin, m') from the sub-block (s, m); d and dmin (n_super, rows),
    sc and m' (n_super, sub-blocks per super-block, rows); no dmin or m' for the signed types."""
    n_sub, rows = s.shape
    per = 256 // t.sub
    S, M = s.reshape(n_sub // per, per, rows), m.reshape(n_sub // per, per, rows)
    if t.signed_scales:
        half = 2 ** (t.scale_bits - 1)
        idx = S.abs().argmax(1, keepdim=True)
        smax = S.gather(1, idx).squeeze(1)
        d = _fp16(smax / -half)
        d = torch.where(d == 0, torch.ones_like(d), d)
        sc = torch.round(S / d[:, None]).clamp_(-half, half - 1)
        # a sub-block far below its super-block's largest step would get step 0, which no solver can round
        # onto (w/a): it gets the smallest step of its sign instead
        sc = torch.where(sc == 0, torch.where(S / d[:, None] < 0, -1.0, 1.0), sc)
        return d, sc, None, None
    top = 2**t.scale_bits - 1
    d = _fp16(S.amax(1) / top)
    d = torch.where(d == 0, torch.ones_like(d), d)
    dmin = _fp16(M.amax(1) / top)
    sc = torch.round(S / d[:, None]).clamp_(1, top)
    mq = torch.round(M / torch.where(dmin == 0, torch.ones_like(dmin), dmin)[:, None]).clamp_(0, top)
    return d, sc, dmin, mq


def _k_grid(d, sc, dmin, mq):
    """(a, b) per sub-block (n_sub, rows) from the super-block factors and the integer steps."""
    a = (d[:, None] * sc).reshape(-1, d.shape[-1])
    b = (dmin[:, None] * mq).reshape(-1, d.shape[-1]) if dmin is not None else torch.zeros_like(a)
    return a, b


def _refine(X, h, t, d, sc, dmin, mq):
    """With the super-block factors fixed, each sub-block tries its integer step (and min) ± 1."""
    lo_sc, hi_sc = (-(2 ** (t.scale_bits - 1)), 2 ** (t.scale_bits - 1) - 1) if t.signed_scales else (1, 2**t.scale_bits - 1)

    def candidates():
        for ds in (0, -1, 1):
            for dm in ((0, -1, 1) if mq is not None else (0,)):
                sc_c = (sc + ds).clamp(lo_sc, hi_sc)
                sc_c = torch.where(sc_c == 0, sc, sc_c)  # a zero step cannot be solved onto
                mq_c = (mq + dm).clamp(0, 2**t.scale_bits - 1) if mq is not None else None
                a, b = _k_grid(d, sc_c, dmin, mq_c)
                yield _error(X, h, a, b, t).reshape(sc.shape), (sc_c, mq_c)

    return _pick(candidates())


def fit_gguf_grid(W: torch.Tensor, tensor_type: str, search: bool = True,
                  importance: torch.Tensor | None = None) -> GGUFGrid:
    """The grid of `tensor_type` for W (rows × cols; cols a multiple of the type's block), fitted on W
    with column weights `importance` (cols,), e.g. the Hessian's diagonal (uniform when None)."""
    t = TENSOR_TYPES[tensor_type]
    rows, cols = W.shape
    if cols % t.block:
        raise ValueError(f"{tensor_type} needs input columns in multiples of {t.block}; this weight has {cols}")
    X = _sub_blocks(W, t.sub)
    h = torch.ones(cols, device=X.device) if importance is None else importance.float().clamp(min=0) + 1e-12 * importance.abs().max()
    h = h.to(X.device).reshape(cols // t.sub, 1, t.sub)
    s, m = _raw_steps(X, h, t, search, fp16=not t.kquant)
    if not t.kquant:
        return GGUFGrid(tensor_type, a=s, b=m, d=s, dmin=m if t.affine else None)
    d, sc, dmin, mq = _quantize_steps(s, m, t)
    if search:
        sc, mq = _refine(X, h, t, d, sc, dmin, mq)
    a, b = _k_grid(d, sc, dmin, mq)
    return GGUFGrid(tensor_type, a=a, b=b, d=d, dmin=dmin, sc=sc.reshape(-1, rows),
                    mins=mq.reshape(-1, rows) if mq is not None else None)


def quantize_codes(W: torch.Tensor, grid: GGUFGrid) -> torch.Tensor:
    """Round-to-nearest codes (rows × cols, fp32 holding integers) of W on `grid`."""
    t = grid.spec
    X = _sub_blocks(W, t.sub)
    q = torch.round((X + grid.b[..., None]) / grid.a[..., None] + t.zero).clamp_(0, t.maxq)
    return q.transpose(0, 1).reshape(W.shape)


def dequantize(codes: torch.Tensor, grid: GGUFGrid) -> torch.Tensor:
    """ŵ = a·(q − z) − b in fp32, in gguf-py's order of operations (rows × cols)."""
    t = grid.spec
    rows, cols = codes.shape
    Q = codes.float().reshape(rows, cols // t.sub, t.sub).transpose(0, 1)
    out = (Q - t.zero).mul_(grid.a[..., None]).sub_(grid.b[..., None])
    return out.transpose(0, 1).reshape(rows, cols)
