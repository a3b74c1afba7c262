"""`GGUFLinear`: a Linear whose weight is stored as GGML blocks of one GGUF tensor type.

A run with `gguf_type` solves every Linear onto the grid its GGUF type holds (`grid.py`),
so the checkpoint keeps exactly those blocks (`qblocks`, uint8, one row of blocks per output
channel) and the GGUF export copies them byte for byte. The forward decodes the blocks once with
gguf-py's own decoder (what llama.cpp's readers compute) and keeps the decoded weight: this layer is
for checking and evaluating a GGUF-bound model in PyTorch, not a fast path (that is llama.cpp's).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .types import TENSOR_TYPES


class GGUFLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, tensor_type: str, bias: bool,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if tensor_type not in TENSOR_TYPES:
            raise ValueError(f"tensor_type={tensor_type!r} is not valid; allowed: {', '.join(TENSOR_TYPES)}")
        spec = TENSOR_TYPES[tensor_type]
        if in_features % spec.block:
            raise ValueError(f"{tensor_type} needs in_features in multiples of {spec.block}; got {in_features}")
        self.in_features, self.out_features, self.tensor_type = in_features, out_features, tensor_type
        self.register_buffer("qblocks", torch.zeros(out_features, spec.row_bytes(in_features), dtype=torch.uint8,
                                                    device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(),
                                                     device=device))
        else:
            self.bias = None
        self._weight: torch.Tensor | None = None  # the decoded weight, made on first use

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None) -> "GGUFLinear":
        """The layer holding a solver's `LayerQuantResult` made on a GGUF grid (`result.gguf`)."""
        from .blocks import pack

        grid = result.gguf
        out_features, in_features = result.codes.shape
        layer = cls(in_features, out_features, grid.type, bias is not None,
                    dtype=None if bias is None else bias.dtype, device=result.codes.device)
        layer.qblocks.copy_(torch.from_numpy(pack(result.codes, grid)))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out × in) as the GGUF file decodes it, in `dtype`."""
        from .blocks import decode

        dense = decode(self.qblocks.detach().cpu().numpy(), self.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(dense)).to(device=self.qblocks.device, dtype=dtype)

    def set_backend(self, backend: str) -> None:
        """One forward path (the decoded weight): "auto" and "reference" name it, other backends are refused."""
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend={backend!r} is not valid for a GGUF layer ({self.tensor_type}); allowed: "
                             "'auto', 'reference' (GGUF checkpoints run fast in llama.cpp, not here)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None or self._weight.dtype != x.dtype or self._weight.device != x.device:
            self._weight = self.dequantize_weight(x.dtype).to(x.device)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self._weight, bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None  # new blocks: decode again
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._weight = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tensor_type={self.tensor_type}"
