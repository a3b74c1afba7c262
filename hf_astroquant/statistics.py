"""Per-Linear calibration statistics: H = 2·X·Xᵀ/N, and against the full-precision stream
D = 2·ΔX·Xᵀ/N and G = 2·ΔX·ΔXᵀ/N, accumulated batch by batch in fp32, or in fp64 and rounded to
fp32 once (`statistics_dtype`): then the sums do not depend on how the windows are split into
batches or ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class Stats:
    """Sums over calibration tokens for one Linear input: Σxᵀx over n tokens, and with the
    full-precision input x̃ (Δx = x̃ − x) Σ Δxᵀx and, when asked, Σ Δxᵀ Δx over the n_fp tokens
    that have one (fp_samples: the first windows of a batch); in the statistics dtype until
    `normalize`, fp32 after."""

    h: torch.Tensor
    n: int
    d: torch.Tensor | None = None
    g: torch.Tensor | None = None
    n_fp: int = 0
    normalized: bool = False

    def normalize(self) -> "Stats":
        """Turn the sums into H = 2·ΣxᵀX/N (and D, G alike over their own tokens), in place and
        once: the Linears of one stage share these statistics, and a scaled copy per Linear would
        double the memory."""
        if not self.normalized:
            self.h = _scaled(self.h, 2.0 / self.n)
            # no token with a full-precision input (an expert routed only outside fp_samples' windows):
            # no D or G, rather than 0/0
            self.d = _scaled(self.d, 2.0 / self.n_fp) if self.d is not None and self.n_fp else None
            self.g = _scaled(self.g, 2.0 / self.n_fp) if self.g is not None and self.n_fp else None
            self.normalized = True
        return self

    def add(self, other: "Stats") -> "Stats":
        self.h.add_(other.h)
        self.n += other.n
        self.n_fp += other.n_fp
        self.d = _sum(self.d, other.d)
        self.g = _sum(self.g, other.g)
        return self


def summing_dtype(option: str | None, distributed: bool) -> torch.dtype:
    """The dtype the statistics are summed in: the `statistics_dtype` option, or for auto (None)
    float64 under torch.distributed (so the result does not depend on the number of ranks) and
    float32 in one process."""
    chosen = option or ("float64" if distributed else "float32")
    return torch.float64 if chosen == "float64" else torch.float32


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t·factor as fp32: in place for fp32 sums; fp64 sums are scaled in fp64 and rounded once."""
    return t.mul_(factor) if t.dtype == torch.float32 else t.mul_(factor).to(torch.float32)


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b (in place into a) where a batch without full-precision windows contributes None."""
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b)


def input_stats(x: torch.Tensor, x_fp: torch.Tensor | None = None, with_g: bool = False,
                dtype: torch.dtype = torch.float32) -> Stats:
    """Statistics of one batch of inputs x (windows, ..., in), and of the full-precision inputs
    x_fp of its first windows (all of them, or fewer with fp_samples), summed in `dtype`."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    h = x.t() @ x
    if not torch.isfinite(torch.diagonal(h)).all():  # a NaN/Inf input shows on the diagonal; cheaper than scanning x
        raise NonFiniteInput()
    stats = Stats(h, x.shape[0])
    if x_fp is not None:
        x_fp = x_fp.reshape(-1, x.shape[-1])
        x = x[:x_fp.shape[0]]  # windows lead, so the first windows are the first rows
        dx = x_fp.to(device=x.device, dtype=dtype) - x
        stats.d = dx.t() @ x
        stats.n_fp = x.shape[0]
        if not torch.isfinite(torch.diagonal(stats.d)).all():
            raise NonFiniteInput()
        if with_g:
            stats.g = dx.t() @ dx
    return stats


class NonFiniteInput(Exception):
    pass
