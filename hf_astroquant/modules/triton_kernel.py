"""Triton de-quantize-matmul: y = x·Wᵀ read straight from GPTQ's int32 layout, for 2, 3, 4, 8 bits.

    W[n, k] = (q[k, n] − z[g_idx[k], n]) · s[g_idx[k], n]

Each program computes one (BLOCK_M, BLOCK_N) tile of y over one of SPLIT_K slices of the input
dimension. Per BLOCK_K rows it unpacks the codes (value k of column n sits at bits [k·b, k·b + b)
of the column's little-endian bit stream: word ⌊k·b/32⌋, shift k·b mod 32, and for 3 bits the high
bits of a value that straddles a word boundary come from the next word), gathers each row's zero
point and scale through g_idx (so act-order needs no permutation and any group layout works),
de-quantizes in fp32, casts to the activation dtype and accumulates with tl.dot in fp32. SPLIT_K > 1
adds the slices' partial tiles atomically into an fp32 output (small batches have too few output
tiles to fill a GPU otherwise).

Nothing is repacked: the kernel reads the layer's own buffers. On CUDA an autotuner picks the tile
sizes and SPLIT_K per (batch bucket, N, K); the configurations are a guess until timed on a GPU.
The kernel is also runnable on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
triton and this module are imported), which is how CI checks it against the reference path; that is for testing
only (thousands of times slower). The interpreter's tl.dot mishandles bf16 operands, so there a bf16
product runs as an fp32 dot of the bf16-rounded operands (the same values a bf16 tensor-core dot
multiplies, accumulated in fp32 as on the GPU).

Triton decides when a function is decorated (`triton.jit`, here at import) whether it is compiled
or interpreted; the autotuned wrapper is built on first use on CUDA.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the CUDA wheels of torch bring it, the CPU wheel does not
    triton = None
    tl = None


def available() -> str | None:
    """None when the kernel can run here, else why not."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    return None


def interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _unpack_bits(ptr, offsets, next_word, shift, mask, BITS: tl.constexpr):
    """The BITS-bit values at bit `shift` of the int32 words at ptr + offsets, as int32. A 3-bit
    value may straddle two words: its high bits are the low bits of the word at + next_word."""
    words = tl.load(ptr + offsets, mask=mask, other=0)
    values = words.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)  # logical shift: no sign bits
    if BITS == 3:
        spill = (shift + BITS > 32) & mask
        following = tl.load(ptr + offsets + next_word, mask=spill, other=0)
        left = tl.where(spill, 32 - shift, 0).to(tl.uint32)  # never a shift by 32
        values = values | tl.where(spill, following.to(tl.uint32, bitcast=True) << left, 0)
    return (values & ((1 << BITS) - 1)).to(tl.int32)


def _dequant_matmul(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
                    M, N, K, m_bucket, stride_xm, stride_xk, zero_words_per_row,
                    BITS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    # zero point of column n: value n of its group's row in qzeros
    z_bit = (rn * BITS)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        q_bit = (rk * BITS)[:, None]
        q = _unpack_bits(qweight_ptr, (q_bit // 32) * N + rn[None, :], N, q_bit % 32, mask_kn, BITS)
        g = tl.load(g_idx_ptr + rk, mask=mask_k, other=0)[:, None]
        z = _unpack_bits(qzeros_ptr, g * zero_words_per_row + z_bit // 32, 1, z_bit % 32, mask_kn, BITS)
        s = tl.load(scales_ptr + g * N + rn[None, :], mask=mask_kn, other=0.0).to(tl.float32)
        w = (q - z).to(tl.float32) * s
        w = w.to(x.dtype)  # the activations' precision, as a de-quantize-then-matmul would use
        if DOT_FP32:  # fp32 activations; or bf16 under the interpreter, whose dot mishandles bf16
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    y_ptrs = y_ptr + rm[:, None] * N + rn[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=mask_mn)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_mn)


def _gpu_configs() -> list:
    configs = []
    for bm, bn, bk, split_k, warps in [
        (16, 64, 64, 1, 4), (16, 64, 128, 1, 4), (16, 128, 64, 1, 4),
        (16, 32, 128, 4, 2), (16, 64, 128, 4, 4), (16, 64, 64, 8, 4), (16, 32, 64, 16, 2),
        (32, 64, 64, 1, 4), (64, 64, 64, 1, 4), (64, 128, 64, 1, 8), (128, 128, 32, 1, 8),
        (64, 64, 64, 2, 4),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k},
                                     num_warps=warps, num_stages=3))
    return configs


def _prune(configs, named_args, **kwargs):
    """Drop configurations whose batch tile is far larger than the batch (wasted work)."""
    m = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return kept or configs


if triton is not None:  # compiled or interpreted as TRITON_INTERPRET says at import
    _unpack_bits = triton.jit(_unpack_bits)
    _dequant_matmul = triton.jit(_dequant_matmul)


@functools.cache
def _autotuned():
    return triton.autotune(_gpu_configs(), key=["m_bucket", "N", "K", "BITS", "DOT_FP32"], reset_to_zero=["y_ptr"],
                           prune_configs_by={"early_config_prune": _prune})(_dequant_matmul)


# For the interpreter, one fixed configuration (tests pass others to cover every code path).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, config: dict | None = None) -> torch.Tensor:
    """y = x · Wᵀ for a (…, K) input and a GPTQ-layout layer with N outputs; y has x's dtype.

    qweight (packed_rows(K), N) int32, qzeros (n_groups, packed_rows(N)) int32, scales
    (n_groups, N), g_idx (K,) int32. `config` fixes the tile sizes (required when interpreting,
    where the autotuner cannot time anything; ignored on CUDA unless given).
    """
    reason = available()
    if reason:
        raise RuntimeError(reason)
    shape = x.shape
    K, N = shape[-1], scales.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    interpret = interpreting()
    config = config or (INTERPRETER_CONFIG if interpret else None)
    args = (x2, qweight, qzeros, scales, g_idx, y, M, N, K, min(triton.next_power_of_2(max(M, 1)), 256),
            x2.stride(0), x2.stride(1), qzeros.shape[1])
    consts = {"BITS": bits, "DOT_FP32": x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16)}
    if config is None:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        _autotuned()[grid](*args, **consts)
    else:  # a fixed configuration bypasses the autotuner
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        _dequant_matmul[grid](*args, **consts, **config)
    return y.to(x.dtype).reshape(*shape[:-1], N)


# A custom op, so that torch.compile treats the launch as one opaque call with a known output shape
# (instead of tracing the autotuner's Python); eager calls cost one dispatch.
@torch.library.custom_op("hf_astroquant::dequant_matmul", mutates_args=())
def _dequant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    return dequant_matmul(x, qweight, qzeros, scales, g_idx, bits)


@_dequant_matmul_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits):
    return x.new_empty(*x.shape[:-1], scales.shape[1])
