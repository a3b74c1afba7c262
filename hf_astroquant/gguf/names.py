"""Tensors under llama.cpp's names, with the rewrites llama.cpp expects.

Tensors keep transformers' (out, in) layout; the writer renames them (gguf's TensorNameMap) and
applies the two rewrites llama.cpp expects. Its `llama` graph applies RoPE to adjacent pairs of
each head's dimensions, transformers' Llama to the two halves, so q_proj / k_proj output rows are
permuted: row r = h·d + i·(d/2) + j (head h, half i, j < d/2) moves to h·d + 2j + i. The permutation
only reorders output rows, so it applies unchanged to already-packed quantized rows. And Gemma 3's
RMSNorm multiplies by (1 + w) where llama.cpp multiplies by w, so norm weights are written w + 1.
Qwen2/3 and Gemma 3 already use the half-split RoPE llama.cpp calls NEOX: no permutation.
"""

from __future__ import annotations

import gguf
import numpy as np

from .architecture import Architecture
from .tensors import FLOAT_TYPES, GGUFTensor, GGUFWriteError

# Where a multimodal checkpoint keeps its language model (transformers 5, then 4.x), and what
# belongs to the other towers (not written: a GGUF for llama.cpp's text model holds the text model).
TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                 "language_model.lm_head.": "lm_head."}
OTHER_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def permute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj / k_proj (or their bias) from transformers' half-split RoPE order to
    llama.cpp's interleaved one; any trailing shape (packed bytes included) rides along."""
    out = data.shape[0]
    if out % (2 * n_head):
        raise GGUFWriteError(f"{out} rows cannot be split into {n_head} heads of an even width")
    return (data.reshape(n_head, 2, out // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))


def unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows` (for reading a file back)."""
    out = data.shape[0]
    return (data.reshape(n_head, out // n_head // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))


def text_name(name: str, arch: Architecture) -> str | None:
    """The language-model state-dict name of `name`; None for another tower's tensor or a buffer."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if arch.text_config:
        if name.startswith(OTHER_TOWERS):
            return None
        for prefix, plain in TEXT_PREFIXES.items():
            if name.startswith(prefix):
                return plain + name[len(prefix):]
    return name


def _cast_float(t: GGUFTensor) -> np.ndarray:
    data = np.asarray(t.data)
    if not np.issubdtype(data.dtype, np.floating):
        raise GGUFWriteError(f"{t.name}: ggml_type {t.ggml_type.name} needs float data, got {data.dtype}")
    out = data.astype(FLOAT_TYPES[t.ggml_type])
    if np.isfinite(data).all() and not np.isfinite(out).all():
        raise GGUFWriteError(f"{t.name}: values overflow {t.ggml_type.name} "
                             f"(largest magnitude {float(np.abs(data).max()):.3g})")
    return np.ascontiguousarray(out)


def _check_packed(t: GGUFTensor) -> np.ndarray:
    data = np.asarray(t.data)
    block, type_size = gguf.GGML_QUANT_SIZES[t.ggml_type]
    if data.dtype != np.uint8 or data.ndim != 2:
        raise GGUFWriteError(f"{t.name}: a {t.ggml_type.name} tensor must be uint8 of shape (out, bytes_per_row), "
                             f"got {data.dtype} {data.shape}")
    if data.shape[1] % type_size:
        raise GGUFWriteError(f"{t.name}: {data.shape[1]} bytes per row is not a whole number of {t.ggml_type.name} "
                             f"blocks ({type_size} bytes per {block} weights)")
    return np.ascontiguousarray(data)


def prepare_tensor(t: GGUFTensor, arch: Architecture, cfg: dict, names: gguf.TensorNameMap) -> tuple[str, np.ndarray] | None:
    """(GGUF name, the array to store) for one tensor, or None when it is not written."""
    name = text_name(t.name, arch)
    if name is None or (name == "lm_head.weight" and cfg.get("tie_word_embeddings")):
        return None  # tied: llama.cpp reuses token_embd as the output matrix
    gguf_name = t.name if t.name == "rope_freqs.weight" else names.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise GGUFWriteError(f"tensor {t.name!r} has no GGUF name for llama.cpp's {arch.name} architecture")
    data = _cast_float(t) if t.ggml_type in FLOAT_TYPES else _check_packed(t)
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        data = np.ascontiguousarray(permute_rows(data, int(heads)))
    if arch.norm_shift and name.endswith("norm.weight"):
        if t.ggml_type not in FLOAT_TYPES:
            raise GGUFWriteError(f"{t.name}: a norm weight must be F32 or F16 (it is written with +{arch.norm_shift})")
        data = (data.astype(np.float32) + arch.norm_shift).astype(data.dtype)
    if gguf_name == "token_embd.weight" and data.shape[0] != int(cfg["vocab_size"]):
        raise GGUFWriteError(f"{t.name}: {data.shape[0]} rows, but config's vocab_size is {cfg['vocab_size']}")
    return gguf_name, data

