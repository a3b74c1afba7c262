"""One step of the bounded rounding search (a beam of K partial solutions per output row).

Each row carries K partial solutions ("beams") with accumulated objective `cost` (rows, K).
At column i every level of the grid is a candidate for every beam, scored by the exact
increment of the layer objective in the GPTQ sweep,

    cost' = cost[beam] + (w_beam − ŵ(level))² / U_ii²,     ŵ(level) = (level − z)·s,

and the K lowest-cost (beam, level) pairs survive. K = 1 is greedy rounding (round to nearest).

Only the K levels nearest to w_beam can be among the K best expansions of that beam (the
increment grows with the distance to w), and they lie within K − 1 levels of the nearest one,
so scoring those 2K − 1 levels per beam is exact while "every level is a candidate" holds.
"""

from __future__ import annotations

import torch


def beam_step(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, d: float, cost: torch.Tensor,
              fractional_zero: bool = False):
    """Expand and prune the beams at one column.

    Args:
        w: (rows·K,) the current (compensated) weight of this column in each beam, beam-minor.
        s, z: (rows·K,) the column's grid scale and zero point, per beam.
        maxq: 2^bits − 1.
        d: U_ii, the column's diagonal of the upper Cholesky factor of H⁻¹.
        cost: (rows, K) accumulated objective of each beam (inf for an unused beam).
        fractional_zero: z is not an integer (a GGUF grid's z + b/a): round after adding it.

    Returns:
        new cost (rows, K); src (rows·K,) the flat index of each new beam's parent; the chosen
        integer level of each new beam (rows·K,), as fp32.
    """
    rows, K = cost.shape
    offsets = torch.arange(-(K - 1), K, device=w.device, dtype=w.dtype)  # 2K − 1 candidates
    nearest = (torch.round(w / s + z) if fractional_zero else torch.round(w / s).add_(z)).clamp_(0, maxq)
    levels = nearest[:, None] + offsets  # (rows·K, 2K − 1)
    # (ŵ − w)²/d² in place: ŵ − w = −(w − ŵ) exactly, and the square drops the sign
    inc = (levels - z[:, None]).mul_(s[:, None]).sub_(w[:, None]).div_(d).square_()
    inc.masked_fill_(levels.lt(0).logical_or_(levels.gt(maxq)), float("inf"))
    total = inc.add_(cost.reshape(rows * K, 1)).reshape(rows, -1)  # (rows, K·(2K − 1))
    new_cost, idx = torch.topk(total, K, dim=1, largest=False, sorted=True)
    src = (idx // (2 * K - 1)).add_(torch.arange(0, rows * K, K, device=w.device)[:, None]).reshape(-1)
    q = levels.reshape(rows, -1).gather(1, idx).reshape(-1)  # `total` and `levels` share one layout
    return new_cost, src, q
