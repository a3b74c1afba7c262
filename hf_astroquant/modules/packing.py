"""GPTQ's int32 packing, for 2, 3, 4 and 8 bits.

Values are laid along a dimension as one little-endian bit stream: value j occupies bits
[j·b, (j+1)·b) of the stream and stream bit k is bit (k mod 32) of int32 word ⌊k/32⌋. For 2, 4 and
8 bits that is GPTQ's "32/b values per word"; for 3 bits a value may straddle two words, exactly
as GPTQ packs 32 three-bit values into 3 words.

`qweight` packs along the input dimension (rows of the (in, out) transposed weight); `qzeros`
packs along the output dimension. A dimension that is not a whole number of words is padded with
zero values (GPTQ itself requires it to be whole).
"""

from __future__ import annotations

import math

import torch


def _pad_unit(bits: int) -> int:
    """Values per whole number of int32 words: 32 / gcd(bits, 32)."""
    return 32 // math.gcd(bits, 32)


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` values of `bits` bits (after padding)."""
    unit = _pad_unit(bits)
    return math.ceil(n / unit) * unit * bits // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 → int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, m) integers in [0, 2^b) → (packed_rows(n), m) int32, packed along dim 0."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} cannot be packed; allowed: 2, 3, 4, 8")
    n, m = values.shape
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values outside [0, {2 ** bits - 1}] cannot be packed in {bits} bits")
    n_words = packed_rows(n, bits)
    if 32 % bits == 0:  # 2, 4, 8 bits: whole values per word; the shifted values never overlap
        per_word = 32 // bits
        v = torch.nn.functional.pad(v, (0, 0, 0, n_words * per_word - n))
        shifts = torch.arange(0, 32, bits, device=v.device).view(1, per_word, 1)
        return _to_int32((v.view(n_words, per_word, m) << shifts).sum(dim=1))
    bit_pos = torch.arange(n, device=v.device) * bits
    word, shift = bit_pos // 32, bit_pos % 32
    words = torch.zeros(n_words, m, dtype=torch.int64, device=v.device)
    low = (v << shift[:, None]) & 0xFFFFFFFF
    words.index_add_(0, word, low)
    spill = shift + bits > 32  # the value's high bits continue in the next word
    if spill.any():
        high = v[spill] >> (32 - shift[spill])[:, None]
        words.index_add_(0, word[spill] + 1, high)
    return _to_int32(words)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: (words, m) int32 → (n, m) int32 values."""
    if 32 % bits == 0:  # 2, 4, 8 bits: whole values per word, one shift per position (the fast path)
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per_word, 1)
        vals = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)  # arithmetic shift; the mask drops the sign
        return vals.reshape(-1, packed.shape[1])[:n]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])])  # a zero word after the last, for the high bits below
    bit_pos = torch.arange(n, device=packed.device) * bits
    word, shift = (bit_pos // 32)[:, None], (bit_pos % 32)[:, None]
    # A value's high bits continue in the next word when shift + bits > 32; otherwise the next word
    # shifted by 32 - shift >= bits lands above the mask. So one expression serves every value, with
    # no branch on the data (torch.compile traces it as one graph).
    return (((w[word[:, 0]] >> shift) | (w[word[:, 0] + 1] << (32 - shift))) & (2**bits - 1)).to(torch.int32)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(m, n) → (m, packed_rows(n)) int32, packed along dim 1 (GPTQ's qzeros layout)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, n).t().contiguous()
