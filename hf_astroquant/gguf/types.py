"""GGUF's quantization types and llama.cpp's per-tensor mixtures, as data.

A *tensor type* (Q4_0, Q4_K, …) is one block layout. Every layout de-quantizes one sub-block of
`sub` consecutive input columns (per output row) as

    ŵ = a·(q − z) − b,      q ∈ [0, 2^bits − 1]

with a per-sub-block step `a` and offset `b` (b = 0 for the symmetric layouts, z = 0 for the
affine ones). The K-quants quantize the sub-block steps and offsets themselves against one fp16
pair (d, dmin) per super-block of 256 columns, so a = d·sc and b = dmin·m with small integers
sc, m (`grid.py` fits them; `blocks.py` packs them).

A *file type* (Q4_K_M, Q3_K_S, …) is llama.cpp's recipe: a base tensor type, some tensors a type
higher (`tensor_type` follows llama.cpp's `llama_tensor_get_type` for the dense decoder tensors we
quantize), and a fallback for rows the base type's block does not tile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorType:
    name: str
    bits: int  # code width
    sub: int  # columns sharing one (a, b)
    block: int  # columns of one stored block (32, or a K-quant's super-block of 256)
    block_bytes: int
    zero: int  # z of ŵ = a·(q − z) − b (0 for the affine layouts)
    affine: bool  # has an offset b (a min)
    scale_bits: int = 0  # K-quants: width of the quantized sub-block steps (and mins)
    signed_scales: bool = False  # K-quants: whether those steps are signed integers

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def kquant(self) -> bool:
        return self.block == 256

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.block_bytes


TENSOR_TYPES: dict[str, TensorType] = {t.name: t for t in (
    TensorType("Q4_0", 4, 32, 32, 18, zero=8, affine=False),
    TensorType("Q4_1", 4, 32, 32, 20, zero=0, affine=True),
    TensorType("Q5_0", 5, 32, 32, 22, zero=16, affine=False),
    TensorType("Q5_1", 5, 32, 32, 24, zero=0, affine=True),
    TensorType("Q8_0", 8, 32, 32, 34, zero=128, affine=False),
    TensorType("Q2_K", 2, 16, 256, 84, zero=0, affine=True, scale_bits=4),
    TensorType("Q3_K", 3, 16, 256, 110, zero=4, affine=False, scale_bits=6, signed_scales=True),
    TensorType("Q4_K", 4, 32, 256, 144, zero=0, affine=True, scale_bits=6),
    TensorType("Q5_K", 5, 32, 256, 176, zero=0, affine=True, scale_bits=6),
    TensorType("Q6_K", 6, 16, 256, 210, zero=32, affine=False, scale_bits=8, signed_scales=True),
)}

# llama.cpp's file types (the `gguf_type` option): name -> (base tensor type, LLAMA_FTYPE number).
FILE_TYPES: dict[str, tuple[str, int]] = {
    "Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q8_0": ("Q8_0", 7), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9),
    "Q2_K": ("Q2_K", 10), "Q3_K_S": ("Q3_K", 11), "Q3_K_M": ("Q3_K", 12), "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18),
}

# Where a block does not tile a row, llama.cpp writes the nearest 32-column type instead.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# The role of a decoder Linear, from the last part of its name (the same in every family we write).
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _recipe_type(file_type: str, role: str | None, layer: int, n_layers: int, n_gqa: int) -> str:
    """The tensor type llama.cpp's recipe gives a decoder tensor (before the shape fallback)."""
    t = FILE_TYPES[file_type][0]
    if role == "attn_v":
        if file_type == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if file_type == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if file_type == "Q3_K_L":
            return "Q5_K"
        if file_type in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            return "Q6_K"
        if file_type == "Q4_K_S" and layer < 4:
            return "Q5_K"
    elif role == "ffn_down":
        if file_type == "Q2_K":
            return "Q3_K"
        if file_type == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if file_type == "Q3_K_L":
            return "Q5_K"
        if file_type in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            return "Q6_K"
        if file_type == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
    elif role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(file_type, t)
    return t


def fit_to_shape(tensor_type: str, cols: int) -> str:
    """The type after llama.cpp's shape fallback; F16 where not even the fallback's block tiles the row."""
    t = tensor_type
    if cols % TENSOR_TYPES[t].block:
        t = FALLBACK.get(t, t)
    return t if cols % TENSOR_TYPES[t].block == 0 else "F16"


def tensor_type(file_type: str, role: str | None, layer: int, n_layers: int, cols: int, n_gqa: int = 1) -> str:
    """The tensor type of a decoder Linear of `cols` input columns in layer `layer` of `n_layers`."""
    return fit_to_shape(_recipe_type(file_type, role, layer, n_layers, n_gqa), cols)


def role_of(name: str) -> str | None:
    return ROLES.get(name.rsplit(".", 1)[-1])


def output_type(file_type: str, cols: int) -> str:
    """The output matrix's type (and a tied token embedding's, which llama.cpp reuses as the output):
    Q6_K, or Q8_0 where the file type's base block does not tile the row or the base is Q8_0."""
    base = FILE_TYPES[file_type][0]
    if cols % TENSOR_TYPES[base].block or base == "Q8_0":
        return "Q8_0"
    return fit_to_shape("Q6_K", cols)


def token_embedding_type(file_type: str, cols: int, tied: bool) -> str:
    """An untied token embedding keeps the file type's base type (after the shape fallback)."""
    return output_type(file_type, cols) if tied else fit_to_shape(FILE_TYPES[file_type][0], cols)
