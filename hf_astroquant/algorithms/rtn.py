"""Round-to-nearest: every group of contiguous input columns gets its own min/max grid,
each weight is rounded independently (no error compensation, no data)."""

from __future__ import annotations

import torch

from .gptq import LayerQuantResult
from .grid import dequantize, fit_groups, quantize


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int = -1, sym: bool = False,
                 mse: bool = False) -> LayerQuantResult:
    W = weight.detach().float()
    rows, cols = W.shape
    gs = cols if group_size == -1 else group_size
    scales, zeros = fit_groups(W, gs, bits, sym, mse=mse)
    g_idx = torch.arange(cols, dtype=torch.int32, device=W.device) // gs
    s, z = scales[g_idx.long()].t(), zeros[g_idx.long()].t()
    codes = quantize(W, s, z, bits)
    return LayerQuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx.cpu(), dequantize(codes, s, z))
