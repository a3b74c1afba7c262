"""`QuantLinear`: a Linear layer whose weight is stored packed in GPTQ's int32 layout.

Persistent tensors (what the checkpoint holds):
    qweight  int32 (packed_rows(in), out)      codes q, packed along the input dimension
    qzeros   int32 (n_groups, packed_rows(out)) zero points z (true values, not GPTQ v1's z − 1)
    scales   fp16  (n_groups, out)              step sizes s
    g_idx    int32 (in,)                        group of each input column
    bias     (out,) in the model's dtype, when the original Linear had one
    input_rotation.signs, input_rotation.mix   with an online input rotation (modules/input_rotation.py)

The weight is W[o, i] = (q[i, o] − z[g_idx[i], o]) · s[g_idx[i], o]; with an input rotation R the
layer computes y = (x·R)·Wᵀ + b (W is then the quantized W_original·R).

Forward paths (`backend`, chosen when the layer is prepared for a device and dtype, never saved):
    "reference"  de-quantize in fp32, cast to the activation dtype, F.linear: the oracle
    "int4"       PyTorch's int4 weight-only kernels (CPU; CUDA with bf16), for 2/3/4 bits
    "int8"       PyTorch's int8 weight-only kernel (CPU), 8 bits with one group per row
    "triton"     our Triton de-quantize-matmul (CUDA), any bit width, group size and g_idx
    "auto"       the first of these that can represent the layer (see `kernels.auto_backends`)
A fast path is checked against the reference on a probe input when it is built; a layer it cannot
represent, or where the check fails, runs the next candidate or the reference path (logged once).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import offload
from . import kernels
from ..gguf.linear import GGUFLinear
from .input_rotation import InputRotation
from .packing import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows

logger = logging.getLogger("hf_astroquant")
_warned: set[str] = set()
_DEQUANTIZE_MIN_ROWS = 1024  # see QuantLinear._dequantize_is_faster


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
        self.input_rotation: InputRotation | None = None
        self.backend = "auto"
        self.active_backend: str | None = None  # what the last preparation chose
        self._fast = None  # (device, dtype, backend, weights) of the prepared fast path
        self._contiguous_groups: bool | None = None  # whether g_idx is the plain i // group_size (cached)
        self._qweight_shape: tuple[int, ...] | None = None  # set while `qweight` lives only in the kernel layout

    @classmethod
    def from_result(cls, result, group_size: int, bits: int, bias: torch.Tensor | None,
                    input_rotation: InputRotation | None = None) -> "QuantLinear":
        """Pack a `LayerQuantResult` (codes (out, in), scales/zeros (n_groups, out), g_idx); the layer
        rotates its input by `input_rotation` when given (the result solved W·R)."""
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
        layer._contiguous_groups = None
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if input_rotation is not None:
            layer.input_rotation = copy.deepcopy(input_rotation).to(device)  # its own tensors in the checkpoint
        return layer

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (in, out), zeros (n_groups, out)) as int32."""
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features)
        if self._qweight_shape is not None:
            return self._fast[3].codes(), zeros
        return unpack_rows(self.qweight, self.bits, self.in_features), zeros

    # The CPU int4 layout holds the codes exactly, so a layer on that path keeps only it and
    # rebuilds the GPTQ-layout `qweight` when it is saved, moved, cast or re-prepared.
    def _release_qweight(self) -> None:
        self._qweight_shape = tuple(self.qweight.shape)
        self.qweight = torch.empty(0, dtype=torch.int32, device=self.qweight.device)

    def _packed_qweight(self) -> torch.Tensor:
        return pack_rows(self._fast[3].codes(), self.bits)

    def _restore_qweight(self) -> None:
        if self._qweight_shape is not None:
            self.qweight = self._packed_qweight()
            self._qweight_shape = None

    def _drop_fast(self) -> None:
        self._restore_qweight()
        self._fast = None
        self.active_backend = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._qweight_shape is not None:
            destination[prefix + "qweight"] = self._packed_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._drop_fast()  # new codes: the kernel layout is stale
        self._contiguous_groups = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized weight, (out, in), computed in fp32 then cast to `dtype`."""
        return self._dequantized_in_out(dtype).t().contiguous()

    def _dequantized_in_out(self, dtype: torch.dtype) -> torch.Tensor:
        """The de-quantized weight transposed, (in, out), as the codes are stored."""
        codes, zeros = self.unpack()
        K, gs = self.in_features, self.group_size
        if self._groups_are_contiguous():
            # groups are contiguous rows: broadcast instead of gathering a full-size zeros/scales copy
            w = (codes.view(self.n_groups, gs, -1) - zeros.unsqueeze(1)).to(torch.float32)
            w = (w * self.scales.unsqueeze(1).to(torch.float32)).view(K, -1)
        else:
            g = self.g_idx.long()
            w = (codes - zeros[g]).to(torch.float32) * self.scales[g].to(torch.float32)
        return w.to(dtype)

    def _groups_are_contiguous(self) -> bool:
        """Whether g_idx is the plain i // group_size, checked once per g_idx (a check inside a traced
        forward would break torch.compile's graph: there the gather, right for any g_idx, runs)."""
        if self._contiguous_groups is None:
            if torch.compiler.is_compiling():
                return False
            self._contiguous_groups = (self.in_features % self.group_size == 0
                                       and torch.equal(self.g_idx, self._plain_g_idx()))
        return self._contiguous_groups

    def _plain_g_idx(self) -> torch.Tensor:
        return torch.arange(self.in_features, device=self.g_idx.device, dtype=torch.int32) // self.group_size

    def set_backend(self, backend: str) -> None:
        """Choose the forward path ("auto", "reference", "int4", "int8", "triton"); takes effect at the next
        `prepare` or forward."""
        kernels.check_backend(backend)
        self._drop_fast()
        self.backend = backend

    @torch.no_grad()
    def prepare(self, dtype: torch.dtype | None = None) -> str:
        """Build the fast path for the buffers' device and activations of `dtype`; return the
        backend that will run. A requested fast path that cannot represent the layer raises."""
        self._drop_fast()
        device = self.qweight.device
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        name = self.backend
        if offload.is_offloaded(self):
            # accelerate loads the buffers around each forward; a kernel layout built from them would
            # stay resident and undo the offload, so de-quantize from the loaded buffers instead.
            if name not in ("auto", "reference"):
                _warn_once(f"astroquant: backend={name!r} ignored for offloaded layers; they run the reference path")
            name = "reference"
        candidates = (kernels.auto_backends(self.bits, self.n_groups, device, dtype) if name == "auto"
                      else [] if name == "reference" else [name])
        name, weights, reasons = "reference", None, []
        codes, zeros = self.unpack() if candidates else (None, None)
        for candidate in candidates:
            try:
                if candidate == "triton":
                    built = kernels.triton_weights(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
                elif candidate == "int4":
                    built = kernels.int4_weights(codes, zeros, self.scales, self.g_idx, self.group_size, self.bits,
                                                 dtype, device)
                else:
                    built = kernels.int8_weights(codes, zeros, self.scales, self.n_groups, dtype, device)
                self._check(built, codes, zeros, dtype)
            except kernels.Unsupported as exc:
                if self.backend != "auto":
                    raise ValueError(f"QuantLinear ({self.extra_repr()}): backend={self.backend!r} cannot run "
                                     f"this layer: {exc}") from None
                reasons.append(f"{candidate}: {exc}")
                continue
            name, weights = candidate, built
            break
        if reasons and weights is None:
            _warn_once(f"astroquant: reference forward for a layer ({self.extra_repr()}): {'; '.join(reasons)}")
        self._fast = (device, dtype, name, weights)
        self.active_backend = name
        # Layers whose large batches de-quantize keep qweight: reading the codes back through the
        # kernel instead would cost about one kernel call on in_features rows on every such batch.
        if (isinstance(weights, kernels.Int4Weights) and weights.invertible
                and not self._prefill_dequantizes(dtype, device) and torch.equal(weights.codes(), codes)):
            self._release_qweight()
        return name

    def _check(self, weights, codes: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> None:
        """Compare the fast path with the de-quantized weight on a probe input (the first and last
        16 output channels), so a kernel whose layout or semantics changed is never used silently."""
        cols = torch.unique(torch.cat([torch.arange(min(16, self.out_features)),
                                       torch.arange(max(0, self.out_features - 16), self.out_features)]))
        cols = cols.to(codes.device)
        g = self.g_idx.long()
        w = (codes[:, cols] - zeros[:, cols][g]).to(torch.float32) * self.scales[:, cols][g].to(torch.float32)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, self.in_features, generator=gen).to(device=codes.device, dtype=dtype)
        ref = x.to(torch.float32) @ w
        got = weights.forward(x).to(torch.float32)[:, cols]
        compute = kernels.INT4_COMPUTE_DTYPE if isinstance(weights, kernels.Int4Weights) else dtype
        tol = 1e-4 if compute == torch.float32 else 2e-2
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if not err <= tol:
            raise kernels.Unsupported(f"the kernel disagrees with the reference on a probe input "
                                      f"(relative error {err:.2e} > {tol:.0e})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        fast = self._fast
        if fast is None or fast[0] != x.device or fast[1] != x.dtype:
            if torch.compiler.is_compiling():  # never repack inside a traced graph
                fast = None
            else:
                self.prepare(x.dtype)
                fast = self._fast
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if fast is None or fast[3] is None or self._dequantize_is_faster(x):
            return F.linear(x, self.dequantize_weight(x.dtype), bias)
        y = fast[3].forward(x)
        return y if bias is None else y + bias

    def _dequantize_is_faster(self, x: torch.Tensor) -> bool:
        """With "auto", a large fp32 batch on CPU (prefill) de-quantizes once and runs the fp32 GEMM:
        the int4 kernel computes in bf16, which CPUs without bf16 instructions run slower than
        fp32 GEMM once the batch amortizes the de-quantization (measured crossover: 512-1024 rows)."""
        return self._prefill_dequantizes(x.dtype, x.device) and x.numel() >= _DEQUANTIZE_MIN_ROWS * self.in_features

    def _prefill_dequantizes(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether large batches of this dtype and device take the de-quantize-then-GEMM path."""
        return self.backend == "auto" and dtype == torch.float32 and device.type == "cpu"

    def _apply(self, fn, recurse=True):
        self._drop_fast()  # moved or cast: the prepared kernel weights are stale
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}"
                + (", rotated input" if self.input_rotation is not None else ""))


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def set_backend(model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = None) -> dict[str, int]:
    """Choose the forward path of every `QuantLinear` in `model` and prepare it for the layers'
    current device and `dtype` (default: the model's dtype); return how many layers run each path
    (a `GGUFLinear` has one, "gguf")."""
    kernels.check_backend(backend)  # before the loop: a model without packed layers still says so
    dtype = dtype or getattr(model, "dtype", None)
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.set_backend(backend)
            name = module.prepare(dtype)
            counts[name] = counts.get(name, 0) + 1
        elif isinstance(module, GGUFLinear):  # its one path
            module.set_backend(backend)
            counts["gguf"] = counts.get("gguf", 0) + 1
    return counts
