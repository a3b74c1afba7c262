"""Round-to-nearest: every group of contiguous input columns gets its own min/max grid,
each weight is rounded independently (no error compensation, no data)."""

from __future__ import annotations

import torch

from ..gguf import grid as gguf_grid
from .gptq import LayerQuantResult
from .grid import dequantize, fit_groups, quantize


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int = -1, sym: bool = False,
                 mse: bool = False, tensor_type: str | None = None) -> LayerQuantResult:
    """`tensor_type` (a GGUF tensor type) rounds onto that type's grid instead (bits, group_size and
    sym are then the type's)."""
    W = weight.detach().float()
    if tensor_type is not None:
        return _rtn_gguf(W, tensor_type, mse)
    rows, cols = W.shape
    gs = cols if group_size == -1 else group_size
    scales, zeros = fit_groups(W, gs, bits, sym, mse=mse)
    g_idx = torch.arange(cols, dtype=torch.int32, device=W.device) // gs
    s, z = scales[g_idx.long()].t(), zeros[g_idx.long()].t()
    codes = quantize(W, s, z, bits)
    return LayerQuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx.cpu(), dequantize(codes, s, z))


def _rtn_gguf(W: torch.Tensor, tensor_type: str, search: bool) -> LayerQuantResult:
    grid = gguf_grid.fit_gguf_grid(W, tensor_type, search=search)
    codes = gguf_grid.quantize_codes(W, grid)
    g_idx = torch.arange(W.shape[1], dtype=torch.int32) // grid.spec.sub
    return LayerQuantResult(codes.to(torch.int32), grid.a, grid.sweep_zero.to(torch.int32), g_idx,
                            gguf_grid.dequantize(codes, grid), gguf=grid)
