"""Scale (and rounding) tuning: a solved layer's grid, tuned through the block's output.

A solved layer holds integer codes q, integer zero points z and a step s per (group, output):

    Ŵ[o, i] = (clamp(⌊q[i, o] + e[i, o] + r[i, o]⌉, 0, 2^b − 1) − z[g(i), o]) · s[g(i), o] · exp(t[g(i), o])

with t = 0 and r = 0 at the start, so Ŵ is the solved weight exactly. Zero points stay fixed. t
moves every step (Ŵ is linear in s·exp(t), so its gradient is exact). Rounding is tuned only where
the solver said how near each decision was: e = x − q, the value x it rounded to q, minus q (in
levels, |e| < ½), and r, each weight's rounding offset, kept in [−½, ½] as in AutoRound, so a code
moves at most one level, and first where its decision was nearest (|e| close to ½). ⌊·⌉ passes its
gradient straight through (d⌊x⌉/dx taken as 1). The log parameterization keeps every step positive.
The new steps s·exp(t) are stored as the layer's fp16 scales, the new codes as its codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RoundedLevels(torch.autograd.Function):
    """clamp(⌊x⌉, 0, maxq) − z, with the straight-through gradient: dL/dx = dL/dy where ⌊x⌉ is on the
    grid [0, maxq] (its ends included), 0 where the clamp moved it. One function rather than autograd's
    chain of round, clamp and subtraction: fewer passes over every weight in each refine step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
        q = torch.round(x)
        on_grid = (q >= 0) & (q <= maxq)
        ctx.save_for_backward(on_grid)
        return q.clamp_(0, maxq).sub_(zero)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (on_grid,) = ctx.saved_tensors
        return grad * on_grid, None, None


class TunedScales(nn.Module):
    """A stand-in for a packed layer during tuning: its codes, zeros and steps, with a learnable log
    factor per step and, when `rounding_error` (e, (in, out)) is given, a learnable rounding offset
    per weight. `codes` (in, out) int, `zeros` (n_groups, out) int, `scales` (n_groups, out),
    `g_idx` (in,) the group of each input column, `maxq` = 2^b − 1, `group_size` the columns per group
    when g_idx is the plain i // group_size (Ŵ is then built by broadcasting; None: gathered per weight),
    `input_rotation` the packed layer's online input rotation (applied to x first), if it has one."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None, maxq: int | None = None, rounding_error: torch.Tensor | None = None,
                 group_size: int | None = None, input_rotation: nn.Module | None = None):
        super().__init__()
        self.input_rotation = input_rotation
        g = g_idx.long()
        self.register_buffer("g", g)
        self.group_size = group_size
        self.register_buffer("steps", scales.to(torch.float32))
        self.log_factor = nn.Parameter(torch.zeros_like(self.steps))
        self.bias = None if bias is None else bias.detach()
        self.maxq = maxq
        if rounding_error is None:
            # (q − z) per weight, in fp32, (in, out): the fixed integer part of Ŵ
            self.register_buffer("levels", (codes.long() - zeros.long()[g]).to(torch.float32))
            self.offset = None
            return
        if maxq is None:
            raise ValueError("TunedScales: tuning the rounding needs maxq (2^bits - 1)")
        # q + e, strictly inside q's rounding interval (ties and values past the grid's ends sit on
        # its edge), so that ⌊q + e⌉ = q at r = 0
        self.register_buffer("unrounded", codes.to(torch.float32) + rounding_error.float().clamp(-0.499, 0.499))
        self.register_buffer("zero_of_weight", zeros.long()[g].to(torch.float32))
        self.offset = nn.Parameter(torch.zeros_like(self.unrounded))

    def tuned_steps(self) -> torch.Tensor:
        """s · exp(t), (n_groups, out)."""
        return self.steps * torch.exp(self.log_factor)

    def tuned_codes(self) -> torch.Tensor:
        """clamp(⌊q + e + r⌉, 0, maxq), (in, out), fp32."""
        with torch.no_grad():
            return torch.round(self.unrounded + self.offset).clamp_(0, self.maxq)

    def keep_offsets_in_range(self) -> None:
        """Project every rounding offset back into [−½, ½] (after an optimizer step)."""
        if self.offset is not None:
            with torch.no_grad():
                self.offset.clamp_(-0.5, 0.5)

    def weight(self) -> torch.Tensor:
        """Ŵ, (out, in), fp32."""
        levels = (self.levels if self.offset is None
                  else _RoundedLevels.apply(self.unrounded + self.offset, self.zero_of_weight, self.maxq))
        steps = self.tuned_steps()
        n_in, n_groups = levels.shape[0], steps.shape[0]
        if self.group_size is not None:  # groups of consecutive columns: broadcast, no per-weight gather
            return (levels.view(n_groups, self.group_size, -1) * steps[:, None, :]).view(n_in, -1).t()
        return (levels * steps.index_select(0, self.g)).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)


def output_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the block's output against its target, in fp32."""
    return (out.float() - target.float()).pow(2).mean()
