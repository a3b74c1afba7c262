"""`QuantLinear`: a Linear layer whose weight is stored packed in GPTQ's int32 layout.

Persistent tensors (what the checkpoint holds):
    qweight  int32 (packed_rows(in), out)      codes q, packed along the input dimension
    qzeros   int32 (n_groups, packed_rows(out)) zero points z (true values, not GPTQ v1's z − 1)
    scales   fp16  (n_groups, out)              step sizes s
    g_idx    int32 (in,)                        group of each input column
    bias     (out,) in the model's dtype, when the original Linear had one

The weight is W[o, i] = (q[i, o] − z[g_idx[i], o]) · s[g_idx[i], o]; it is de-quantized in fp32
and cast to the activation dtype, so the result is the same in fp32, fp16 and bf16 up to that cast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"QuantLinear: bits={bits!r} is not supported; allowed: 2, 3, 4, 8")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        self.n_groups = math.ceil(in_features / self.group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(self.n_groups, packed_rows(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(self.n_groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(), **kw))
        else:
            self.bias = None

    @classmethod
    def from_result(cls, result, group_size: int, bits: int, bias: torch.Tensor | None) -> "QuantLinear":
        """Pack a `LayerQuantResult` (codes (out, in), scales/zeros (n_groups, out), g_idx)."""
        out_features, in_features = result.codes.shape
        device = result.codes.device
        layer = cls(in_features, out_features, bits, group_size, bias is not None,
                    dtype=None if bias is None else bias.dtype, device=device)
        if result.scales.shape[0] != layer.n_groups:
            raise ValueError(f"{result.scales.shape[0]} groups given, {layer.n_groups} expected")
        layer.qweight.copy_(pack_rows(result.codes.t(), bits))
        layer.qzeros.copy_(pack_cols(result.zeros, bits))
        layer.scales.copy_(result.scales.to(torch.float16))
        layer.g_idx.copy_(result.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (in, out), zeros (n_groups, out)) as int32."""
        return (unpack_rows(self.qweight, self.bits, self.in_features),
                unpack_cols(self.qzeros, self.bits, self.out_features))

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized weight, (out, in), computed in fp32 then cast to `dtype`."""
        codes, zeros = self.unpack()
        g = self.g_idx.long()
        w = (codes - zeros[g]).to(torch.float32) * self.scales[g].to(torch.float32)
        return w.t().to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
