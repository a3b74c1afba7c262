"""Scale tuning: a solved layer's grid steps, tuned through the block's output.

A solved layer holds integer codes q, integer zero points z and a step s per (group, output):

    Ŵ[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o] · exp(t[g(i), o])

with t = 0 at the start, so Ŵ is the solved weight exactly. Codes and zero points stay fixed (they
are the packed format's integers); only t moves, and Ŵ is linear in s·exp(t), so the gradient of
any loss through the block is exact (no straight-through estimate). The log parameterization keeps
every step positive. The new steps s·exp(t) are stored as the layer's fp16 scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TunedScales(nn.Module):
    """A stand-in for a packed layer during tuning: its codes, zeros and steps, with a learnable log
    factor per step. `codes` (in, out) int, `zeros` (n_groups, out) int, `scales` (n_groups, out),
    `g_idx` (in,) the group of each input column."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        g = g_idx.long()
        # (q − z) per weight, in fp32, (in, out): the fixed integer part of Ŵ
        self.register_buffer("levels", (codes.long() - zeros.long()[g]).to(torch.float32))
        self.register_buffer("g", g)
        self.register_buffer("steps", scales.to(torch.float32))
        self.log_factor = nn.Parameter(torch.zeros_like(self.steps))
        self.bias = None if bias is None else bias.detach()

    def tuned_steps(self) -> torch.Tensor:
        """s · exp(t), (n_groups, out)."""
        return self.steps * torch.exp(self.log_factor)

    def weight(self) -> torch.Tensor:
        """Ŵ, (out, in), fp32."""
        return (self.levels * self.tuned_steps()[self.g]).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)


def output_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the block's output against its target, in fp32."""
    return (out.float() - target.float()).pow(2).mean()
