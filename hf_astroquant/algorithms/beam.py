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


def beam_step(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, d: float, cost: torch.Tensor):
    """Expand and prune the beams at one column.

    Args:
        w: (rows·K,) the current (compensated) weight of this column in each beam, beam-minor.
        s, z: (rows·K,) the column's grid scale and zero point, per beam.
        maxq: 2^bits − 1.
        d: U_ii, the column's diagonal of the upper Cholesky factor of H⁻¹.
        cost: (rows, K) accumulated objective of each beam (inf for an unused beam).

    Returns:
        new cost (rows, K); src (rows·K,) the flat index of each new beam's parent; the chosen
        integer level of each new beam (rows·K,), as fp32.
    """
    rows, K = cost.shape
    offsets = torch.arange(-(K - 1), K, device=w.device, dtype=w.dtype)  # 2K − 1 candidates
    nearest = torch.round(w / s).add_(z).clamp_(0, maxq)
    levels = nearest[:, None] + offsets  # (rows·K, 2K − 1)
    dq = (levels - z[:, None]) * s[:, None]
    inc = ((w[:, None] - dq) / d).square_()
    inc.masked_fill_((levels < 0) | (levels > maxq), float("inf"))
    total = (cost.reshape(rows * K, 1) + inc).reshape(rows, -1)  # (rows, K·(2K − 1))
    new_cost, idx = torch.topk(total, K, dim=1, largest=False, sorted=True)
    n_cand = 2 * K - 1
    parent = idx // n_cand
    src = (parent + torch.arange(rows, device=w.device)[:, None] * K).reshape(-1)
    chosen = levels.reshape(rows, K, n_cand).gather(1, parent[..., None].expand(rows, K, n_cand))
    q = chosen.gather(2, (idx % n_cand)[..., None]).reshape(-1)
    return new_cost, src, q
