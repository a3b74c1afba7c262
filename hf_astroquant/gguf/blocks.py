"""Pack solved codes and their GGUF grid into GGML's block layouts (the inverse of gguf-py's decoders).

Each row of a weight (out × in) is packed on its own into in/block blocks; a block is the type's
fp16 factors, its integer sub-block steps (K-quants) and its codes, laid out as gguf-py's
`gguf.quants` reads them (`dequantize_blocks` of each class names every bit). The layouts:

    Q4_0/Q5_0/Q8_0  d, [qh: bit j = code j's 5th bit], codes (4-bit: byte l holds codes l, l+16)
    Q4_1/Q5_1       d, m, [qh], codes
    Q2_K  scales[16] (sc | m<<4), qs[64] (byte 32h+l holds codes 128h+32j+l at bits 2j), d, dmin
    Q3_K  hmask[32] (bit j of byte l: code 32j+l's bit 2), qs[64] as Q2_K, 6-bit (sc+32) in 12 bytes, d
    Q4_K  d, dmin, 6-bit sc and m in 12 bytes, qs[128] (byte 32c+l holds codes 64c+l, 64c+32+l)
    Q5_K  d, dmin, 12 bytes, qh[32] (bit j of byte l: code 32j+l's bit 4), qs[128] as Q4_K
    Q6_K  ql[128] (byte 64h+l: codes 128h+l, 128h+64+l), qh[64] (byte 32h+l: codes 128h+32j+l at bits 2j),
          int8 scales[16], d

`decode` is gguf-py's own decoder: what llama.cpp's file readers see.
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import GGUFGrid
from .types import TENSOR_TYPES


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(..., ) fp32 holding fp16 values -> (..., 2) little-endian bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bits_of(codes: np.ndarray, bit: int, groups: int) -> np.ndarray:
    """(..., groups·32) codes -> (..., 32) bytes whose bit j is `bit` of code 32j + l."""
    b = (codes.reshape(*codes.shape[:-1], groups, 32) >> bit) & 1
    return (b << np.arange(groups, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)


def _two_bit_planes(codes: np.ndarray) -> np.ndarray:
    """(..., 256) 2-bit values -> (..., 64): byte 32h + l holds values 128h + 32j + l at bits 2j."""
    c = codes.reshape(*codes.shape[:-1], 2, 4, 32) & 3
    return (c << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2).astype(np.uint8).reshape(*codes.shape[:-1], 64)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(..., 8) 6-bit steps and mins -> (..., 12) bytes in Q4_K/Q5_K's packing."""
    out = np.empty((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return out


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """(..., 16) 6-bit unsigned steps -> (..., 12) bytes in Q3_K's packing."""
    out = np.zeros((*s.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:8] = _nibbles(s[..., 0:8], s[..., 8:16])
    hi = (s >> 4) & 3  # bits 4-5 of step i go to byte 8 + i%4 at shift 2·(i//4)
    for k in range(4):
        out[..., 8:12] |= (hi[..., 4 * k:4 * k + 4] << (2 * k)).astype(np.uint8)
    return out


def pack(codes: torch.Tensor, grid: GGUFGrid) -> np.ndarray:
    """uint8 (rows, bytes per row) of `codes` (rows × cols, integers) on `grid`, in GGML's layout."""
    t = grid.spec
    rows, cols = codes.shape
    nb = cols // t.block
    q = codes.to(torch.int64).cpu().numpy().astype(np.uint8).reshape(rows, nb, t.block)

    def per_block(x):  # (n per row, rows) -> (rows, nb, n per block)
        return x.detach().cpu().numpy().T.reshape(rows, nb, -1)

    def factor(x):  # one fp16 value per block -> (rows, nb, 2) bytes
        return _f16_bytes(per_block(x)[..., 0])

    if not t.kquant:
        parts = [factor(grid.d)]
        if t.affine:
            parts.append(factor(-grid.dmin))  # the stored min is −b
        if t.bits == 5:
            qh = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            parts.append(qh.sum(-1, dtype=np.uint32).astype("<u4")[..., None].view(np.uint8))
        if t.bits == 8:
            parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            parts.append(_nibbles(q[..., :16], q[..., 16:]))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    sc = per_block(grid.sc).astype(np.int64)
    d = factor(grid.d)
    if t.name == "Q2_K":
        mn = per_block(grid.mins).astype(np.uint8)
        parts = [_nibbles(sc.astype(np.uint8), mn), _two_bit_planes(q), d, factor(grid.dmin)]
    elif t.name == "Q3_K":
        parts = [_bits_of(q, 2, 8), _two_bit_planes(q), _q3_scales((sc + 32).astype(np.uint8)), d]
    elif t.name in ("Q4_K", "Q5_K"):
        mn = per_block(grid.mins).astype(np.uint8)
        parts = [d, factor(grid.dmin), _k4_scales(sc.astype(np.uint8), mn)]
        if t.name == "Q5_K":
            parts.append(_bits_of(q, 4, 8))
        halves = q.reshape(rows, nb, 4, 2, 32)
        parts.append(_nibbles(halves[..., 0, :], halves[..., 1, :]).reshape(rows, nb, 128))
    elif t.name == "Q6_K":
        h = q.reshape(rows, nb, 2, 2, 64)
        ql = _nibbles(h[..., 0, :], h[..., 1, :]).reshape(rows, nb, 128)
        qh = _two_bit_planes(q >> 4)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(f"no packing for GGUF type {t.name}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def decode(blocks: np.ndarray, tensor_type: str) -> np.ndarray:
    """fp32 (rows, cols) of packed rows, decoded by gguf-py (what every GGUF reader computes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(np.ascontiguousarray(blocks), GGMLQuantizationType[tensor_type])


def row_bytes(tensor_type: str, cols: int) -> int:
    return TENSOR_TYPES[tensor_type].row_bytes(cols)
