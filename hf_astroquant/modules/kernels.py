"""Fast forward paths of `QuantLinear`: PyTorch's own weight-only int4 and int8 kernels, and our
Triton de-quantize-matmul (`triton_kernel.py`, CUDA) for every bit width and group layout.

int4 (``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA; both run
in bf16 whatever the activations' dtype, see `INT4_COMPUTE_DTYPE`) computes y = x·Wᵀ with

    W[n, k] = (q[n, k] − 8) · scale[t, n] + zero[t, n],   t = k // kg,   kg ∈ {32, 64, 128, 256}.

Our layer stores W[n, k] = (q[k, n] − z[g, n]) · s[g, n] with g = g_idx[k], so the map is exact:
scale = s, zero = (8 − z)·s. 2- and 3-bit codes are int4 codes (a subset of 0..15); they are
shifted to the middle of 0..15 (q + 8 − 2^(b−1), zero = (2^(b−1) − z)·s) because the kernel adds
(q − 8)·scale and zero in the activation dtype: with codes near 0, both terms are several steps
large and cancel, and bf16's rounding of `zero` would then cost ~1 % of every weight.
Act-order checkpoints (g_idx not sorted) permute the input columns once per call so that every
group is contiguous; a group larger than 256 columns (group_size=-1 included) is split into kernel
groups that share one scale. N is padded with zero rows to a multiple of 32 (the CPU layout's
block of rows; the kernel itself needs 16).

The packed layout is private to the kernel and differs between torch's CPU dispatch levels (AVX2 and
AVX-512 pack rows in different blocks), so we never read it. The codes come back through the kernel
itself (`Int4Weights.codes`): fed the identity, it returns every weight (q − 8)·scale + zero, and
the grid inverts that exactly (the bf16 rounding of the output, ≤ 16·scale·2⁻⁹, is far below half a
step). So a layer on this path need not also keep its GPTQ-layout `qweight`: `QuantLinear` rebuilds
it on demand (saving, moving, the reference path), after checking the inverse against its codes.

int8 (``aten._weight_int8pack_mm``, CPU) has one scale per output row and no zero point; with one
group per row, W = (q − z)·s = s·(q − 128) + s·(128 − z), so
y = int8mm(x, q − 128, s) + (Σ_k x_k) · s·(128 − z).
Its vectorized bf16 path reads past the end of a row whose length K is not a multiple of the vector
width, and crashes the process (seen with torch 2.13: K = 196 on AVX2, K = 200 on AVX-512, from 4
rows of activations on). K is therefore always padded with zero columns to a multiple of
`INT8_K_ALIGN`, wider than any x86 vector of bf16 (AVX-512: 32, AMX tiles: 32), so no dispatch level
is handed a row tail.

Triton (CUDA) reads the GPTQ-layout buffers themselves (nothing repacked, nothing copied) and keeps
the activations' dtype; `auto` prefers it on CUDA except for bf16 activations with ≤ 4 bits, where
the aten int4 kernel computes in its own dtype anyway.

Everything here is a pure function of the packed tensors; `QuantLinear` owns the caching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "int4", "int8", "triton")
# The int4 kernels always compute in bf16: the CUDA kernel takes nothing else, and the CPU kernel's
# fp32 and fp16 paths are not vectorized (10-100x slower than bf16 on an AVX2 machine). Rounding
# the inputs to bf16 (2^-9 relative) costs far less than the weights' own 2-4-bit rounding; the
# output comes back in the input's dtype.
INT4_COMPUTE_DTYPE = torch.bfloat16
_KERNEL_GROUPS = (256, 128, 64, 32)
_N_TILE = 32
INT8_K_ALIGN = 64
_IDENTITY_ROWS = 256  # rows of the identity per kernel call when reading codes back (bounds the memory)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")


class Unsupported(Exception):
    """A fast path cannot represent this layer (the message says why)."""


@dataclass
class Int4Weights:
    """A layer repacked for the aten int4 kernel of one device."""

    packed: torch.Tensor  # the kernel's own layout
    scale_zero: torch.Tensor  # (K / kg, N_pad, 2) in the kernel's compute dtype
    kernel_group: int
    perm: torch.Tensor | None  # input column order, None when already grouped
    out_features: int
    shift: int = 0  # added to every code (2/3 bits)

    @property
    def invertible(self) -> bool:
        """Whether a layer may rely on `codes()` alone (QuantLinear still checks the result against its
        codes first). CPU only: the CUDA path keeps `qweight`, as nothing there has been measured."""
        return self.packed.device.type == "cpu"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """The kernel on (M, K) activations already in kernel column order and compute dtype: (M, N_pad)."""
        if x2.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.kernel_group,
                                                              self.scale_zero)
        return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.packed, self.kernel_group, self.scale_zero)

    def codes(self) -> torch.Tensor:
        """The layer's codes, (in, out) int32 in the original column order, read back through the kernel.

        Row k of the identity gives W[:, k] = (q[:, k] − 8)·scale[t] + zero[t] (t = k // kernel_group),
        so q = round((W − zero) / scale) + 8 − shift. A zero scale cannot be inverted (any code gives
        the same weight); the caller's check against the true codes then keeps `qweight`.
        """
        k = self.scale_zero.shape[0] * self.kernel_group
        scale = self.scale_zero[..., 0].to(torch.float32)  # (T, N_pad): the values the kernel uses
        zero = self.scale_zero[..., 1].to(torch.float32)
        divisor = scale.where(scale != 0, torch.ones_like(scale))
        chunks = []
        for start in range(0, k, _IDENTITY_ROWS):
            rows = torch.arange(start, min(k, start + _IDENTITY_ROWS), device=self.packed.device)
            eye = torch.zeros(rows.numel(), k, dtype=self.scale_zero.dtype, device=self.packed.device)
            eye[torch.arange(rows.numel(), device=eye.device), rows] = 1
            w = self._matmul(eye).to(torch.float32)  # (rows, N_pad): W transposed
            t = rows // self.kernel_group
            q = torch.round((w - zero[t]) / divisor[t])
            chunks.append(q[:, : self.out_features].to(torch.int32) + 8 - self.shift)
        q = torch.cat(chunks)  # (K, N) in kernel column order
        if self.perm is None:
            return q.contiguous()
        out = torch.empty_like(q)
        out[self.perm] = q
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self._matmul(x2.to(self.scale_zero.dtype))
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@dataclass
class Int8Weights:
    """A one-group-per-row 8-bit layer repacked for ``aten._weight_int8pack_mm``."""

    weight: torch.Tensor  # (N, K_pad) int8, q − 128, zero columns past K (see INT8_K_ALIGN)
    scales: torch.Tensor  # (N,) activation dtype
    offset: torch.Tensor  # (N,) s·(128 − z), activation dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        pad = self.weight.shape[1] - shape[-1]
        xk = F.pad(x2, (0, pad)) if pad else x2  # never hand the kernel a row tail (module docstring)
        y = torch.ops.aten._weight_int8pack_mm(xk.contiguous(), self.weight, self.scales)
        y = y + x2.sum(dim=1, keepdim=True) * self.offset
        return y.reshape(*shape[:-1], y.shape[-1])


@dataclass
class TritonWeights:
    """A layer's own GPTQ-layout buffers, run through the Triton kernel (no copy)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hf_astroquant.dequant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)


def triton_weights(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   bits: int) -> TritonWeights:
    """The Triton path for a layer whose buffers live on `qweight.device`. Raises `Unsupported`."""
    from . import triton_kernel

    reason = triton_kernel.available()
    if reason:
        raise Unsupported(reason)
    device = qweight.device
    if device.type != "cuda" and not (device.type == "cpu" and triton_kernel.interpreting()):
        raise Unsupported(f"the Triton kernel runs on CUDA, not {device.type} (on CPU only under "
                          "TRITON_INTERPRET=1, for testing)")
    return TritonWeights(qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous(), bits)


def group_order(g_idx: torch.Tensor, group_size: int, in_features: int) -> tuple[torch.Tensor | None, int]:
    """(input column permutation or None, kernel group) such that after permuting, every run of
    `kernel group` columns belongs to one quantization group. Raises `Unsupported`."""
    g = g_idx.long()
    perm = None
    if bool((g[1:] < g[:-1]).any()):
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    for kg in _KERNEL_GROUPS:
        if in_features % kg == 0 and bool((g.view(-1, kg) == g.view(-1, kg)[:, :1]).all()):
            return perm, kg
    raise Unsupported(
        f"in_features={in_features} with group_size={group_size} has no run of 32, 64, 128 or 256 columns "
        "per group (the int4 kernel's groups)"
    )


def int4_weights(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 group_size: int, bits: int, dtype: torch.dtype, device: torch.device) -> Int4Weights:
    """Repack a layer for the int4 kernel on `device` with activations of `dtype`.

    codes (in, out) and zeros (n_groups, out) int32, scales (n_groups, out), g_idx (in,).
    """
    if bits > 4:
        raise Unsupported(f"{bits}-bit codes do not fit the int4 kernel")
    if device.type not in ("cpu", "cuda"):
        raise Unsupported(f"no int4 kernel on {device.type}")
    in_features, out_features = codes.shape
    perm, kg = group_order(g_idx, group_size, in_features)
    q = codes.t() if perm is None else codes.index_select(0, perm).t()  # (N, K)
    g_cols = g_idx.long() if perm is None else g_idx.long()[perm]
    g_kernel = g_cols[::kg]  # the quantization group of each kernel group
    shift = 8 - 2 ** (bits - 1)  # 0 for 4 bits
    q = q + shift
    s = scales.to(torch.float32)[g_kernel]  # (T, N)
    zero = (8.0 - shift - zeros[g_kernel].to(torch.float32)) * s
    n_pad = -out_features % _N_TILE
    q = F.pad(q, (0, 0, 0, n_pad)).contiguous()
    scale_zero = F.pad(torch.stack([s, zero], dim=-1), (0, 0, 0, n_pad))
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to("cpu", torch.int32), 1)
    else:
        inner_k_tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
        if inner_k_tiles is None:
            raise Unsupported(f"in_features={in_features} is not a multiple of 32 (CUDA int4 kernel)")
        as_bytes = (q[:, ::2] << 4 | q[:, 1::2]).to(device=device, dtype=torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles)
    scale_zero = scale_zero.to(device=device, dtype=INT4_COMPUTE_DTYPE).contiguous()
    return Int4Weights(packed.to(device), scale_zero, kg, None if perm is None else perm.to(device), out_features,
                       shift)


def int8_weights(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, n_groups: int,
                 dtype: torch.dtype, device: torch.device) -> Int8Weights:
    """Repack an 8-bit layer with one group per row for ``aten._weight_int8pack_mm`` (CPU)."""
    if device.type != "cpu":
        raise Unsupported(f"the int8 kernel path is CPU only, not {device.type}")
    if n_groups != 1:
        raise Unsupported(f"the int8 kernel has one scale per row; this layer has {n_groups} groups")
    s = scales[0].to(torch.float32)
    weight = (codes.t().to(torch.int32) - 128).to(torch.int8)
    weight = F.pad(weight, (0, -weight.shape[1] % INT8_K_ALIGN)).contiguous()
    offset = s * (128.0 - zeros[0].to(torch.float32))
    return Int8Weights(weight.to(device), s.to(device=device, dtype=dtype), offset.to(device=device, dtype=dtype))


def auto_backends(bits: int, n_groups: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The fast paths `backend="auto"` tries, in order (the reference path when none can run).

    CPU: the int4 kernel for 2/3/4 bits, the int8 kernel for one-group 8-bit layers.
    CUDA: the aten int4 kernel first for ≤ 4 bits with bf16 activations (its compute dtype), else
    Triton first, which keeps fp16/fp32 activations unrounded; each falls back to the other.
    """
    if device.type == "cpu":
        if bits <= 4:
            return ["int4"]
        return ["int8"] if bits == 8 and n_groups == 1 else []
    if device.type == "cuda":
        if bits <= 4:
            return ["int4", "triton"] if dtype == torch.bfloat16 else ["triton", "int4"]
        return ["triton"]
    return []
