"""`export_gguf`: one GGUF file (llama.cpp, Ollama, LM Studio) from a saved model directory.

- A checkpoint quantized with `gguf_type` holds each Linear as GGML blocks already (`qblocks`):
  they are copied byte for byte, so the file decodes to exactly the weights our solver chose. The
  tensors the run left in full precision are written as llama.cpp's recipe for that file type
  writes them: the output matrix (or a tied token embedding) as Q6_K, or Q8_0 where a row is not
  a multiple of 256; an untied token embedding in the base type; norms and biases F32; a Linear no
  block tiles F16. Those few matrices are rounded to nearest on their grid with the grid search
  (`fit_gguf_grid`), as llama.cpp's quantizer rounds them without an importance matrix.
- A full-precision directory is written as F16 or F32 (the input llama.cpp's own quantizer takes).
- A checkpoint on our integer grids (no `gguf_type`) is refused: no GGUF type holds its grid exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..config import CHECKPOINT_FORMAT, QUANT_METHOD
from ..export.source import SERVABLE_KEYS, ExportError, shards
from ..output_dir import OutputError, check_apart, clean_leftovers
from .architecture import architecture_of, text_config
from .blocks import pack
from .grid import fit_gguf_grid, quantize_codes
from .names import text_name
from .tensors import FULL_PRECISION_FILE_TYPES, GGUFTensor
from .types import FILE_TYPES, output_type, token_embedding_type
from .writer import WRITTEN_BY, export_gguf_full_precision, write_gguf

logger = logging.getLogger("hf_astroquant")
GGUF_TYPES = tuple(FULL_PRECISION_FILE_TYPES) + tuple(FILE_TYPES)
ROWS_PER_CHUNK = 4096  # rows of an embedding rounded at once (bounded memory for 150k-token vocabularies)


def round_to_type(W: torch.Tensor, tensor_type: str) -> np.ndarray:
    """W (rows × cols) rounded to nearest on its fitted `tensor_type` grid, as packed GGML rows."""
    if tensor_type in ("F16", "F32"):
        raise ValueError(f"{tensor_type} is not a block type")
    parts = []
    for chunk in W.float().split(ROWS_PER_CHUNK):
        grid = fit_gguf_grid(chunk, tensor_type, search=True)
        parts.append(pack(quantize_codes(chunk, grid), grid))
    return np.concatenate(parts)


def _matrix(name: str, W: torch.Tensor, tensor_type: str) -> GGUFTensor:
    if tensor_type == "F16":
        return GGUFTensor(name, W.float().numpy(), GGMLQuantizationType.F16)
    return GGUFTensor(name, round_to_type(W, tensor_type), GGMLQuantizationType[tensor_type])


def _check_quantized(src: Path, q: dict, gguf_type: str | None) -> str:
    """The checkpoint's file type, after checking it is ours and on GGUF grids."""
    if q.get("quant_method") != QUANT_METHOD:
        raise ExportError(f"{src} is quantized by {q.get('quant_method')!r}, not {QUANT_METHOD!r}: only full-precision "
                          "directories and hf_astroquant checkpoints quantized with gguf_type can be written as GGUF")
    if q.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{src}: checkpoint_format {q.get('checkpoint_format')!r} is not {CHECKPOINT_FORMAT!r}")
    unknown = sorted(set(q) - SERVABLE_KEYS)
    if unknown:
        raise ExportError(f"{src}: option(s) {unknown} are not known to the GGUF export: refusing to export")
    file_type = q.get("gguf_type")
    if file_type is None:
        raise ExportError(f"{src} is on hf_astroquant's integer grids (bits={q.get('bits')}, group_size="
                          f"{q.get('group_size')}), which no GGUF type holds exactly: quantize with gguf_type "
                          f"(one of {', '.join(FILE_TYPES)}) to export GGUF, or export --format gptq")
    if gguf_type not in (None, file_type):
        raise ExportError(f"gguf_type={gguf_type!r}, but {src} was solved onto {file_type!r} grids: a quantized "
                          "checkpoint is written in the type it was solved for (leave gguf_type out)")
    if not q.get("gguf_tensor_types"):
        raise ExportError(f"{src}: the config records no gguf_tensor_types")
    return file_type


def quantized_tensors(src: Path, config: dict, q: dict) -> Iterator[GGUFTensor]:
    """Every tensor of a gguf_type checkpoint, ready for write_gguf (see the module docstring)."""
    from safetensors import safe_open

    file_type, types = q["gguf_type"], q["gguf_tensor_types"]
    arch = architecture_of(config)
    tied = bool(text_config(config, arch).get("tie_word_embeddings", config.get("tie_word_embeddings")))
    for shard in shards(src):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if module in types and leaf == "weight":
                    continue  # the load guard of our own format (checkpoint/guard.py), not a weight
                t = f.get_tensor(key)
                if leaf == "qblocks":
                    if module not in types:
                        raise ExportError(f"{src}: {key} has no entry in gguf_tensor_types")
                    yield GGUFTensor(f"{module}.weight", t.numpy(), GGMLQuantizationType[types[module]])
                elif not t.is_floating_point():
                    raise ExportError(f"{shard.name}: tensor {key!r} is {t.dtype}; only GGML blocks and floats "
                                      "are written")
                elif t.dim() == 1:
                    yield GGUFTensor(key, t.float().numpy(), GGMLQuantizationType.F32)
                else:
                    yield _matrix(key, t, _full_precision_type(key, t, arch, file_type, tied))


def _full_precision_type(key: str, W: torch.Tensor, arch, file_type: str, tied: bool) -> str:
    """llama.cpp's type for a matrix the run left in full precision."""
    name = text_name(key, arch) or key
    cols = W.shape[-1]
    if name == "lm_head.weight":
        return output_type(file_type, cols)
    if name.endswith("embed_tokens.weight"):
        return token_embedding_type(file_type, cols, tied)
    return "F16"  # a Linear no block of its type tiles (llama.cpp's last fallback)


def export_gguf(src: str | Path, out: str | Path, gguf_type: str | None = None, *, name: str | None = None,
                overwrite: bool = False) -> dict:
    """Write `out` (a .gguf file) from the saved model directory `src`.

    `src` quantized with gguf_type: its blocks are copied exactly (gguf_type may be left out or must
    name the same type). `src` in full precision: gguf_type "F16" (default) or "F32". The file
    appears only when complete. Returns write_gguf's summary (path, arch, tensors, tensor_types,
    bytes, file_type, tokenizer, tokenizer_pre)."""
    src, out = Path(src), Path(out)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not valid; allowed: {', '.join(GGUF_TYPES)}")
    check_apart(out, {"the checkpoint read": src})
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not written_by_us(out):
        raise OutputError(f"{out} is not a GGUF file that hf-astroquant wrote; overwrite replaces only such a file: "
                          "move it away or name another output")
    for line in clean_leftovers(out):
        logger.warning("%s", line)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a saved transformers model directory")
    config = json.loads(config_path.read_text())
    q = config.get("quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}-gguf")
    try:
        summary, file_type = _write(src, partial, config, q, gguf_type, name)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dict(summary, path=str(out), gguf_type=file_type)


def written_by_us(path: Path) -> bool:
    """Whether `path` is a well-formed GGUF file whose general.quantized_by names us."""
    from .header import GGUFFileError, check_gguf_file

    try:
        check_gguf_file(path)
        field = gguf.GGUFReader(str(path)).fields.get(gguf.Keys.General.QUANTIZED_BY)
        return field is not None and field.contents() == WRITTEN_BY
    except (GGUFFileError, OSError, ValueError):
        return False


def _write(src: Path, partial: Path, config: dict, q: dict | None, gguf_type: str | None, name: str | None):
    """(write_gguf's summary, the file type) for the file written to `partial`."""
    if q:
        file_type = _check_quantized(src, q, gguf_type)
        summary = write_gguf(partial, src, quantized_tensors(src, config, q), file_type=FILE_TYPES[file_type][1],
                             name=name)
    else:
        gguf_type = gguf_type or "F16"
        if gguf_type not in FULL_PRECISION_FILE_TYPES:
            raise ExportError(f"{src} is a full-precision model: gguf_type={gguf_type!r} needs a checkpoint quantized "
                              f"with gguf_type={gguf_type!r} first (hf-astroquant quantize --gguf-type {gguf_type}); "
                              f"a full-precision model is written as {' or '.join(FULL_PRECISION_FILE_TYPES)}")
        file_type = gguf_type
        summary = export_gguf_full_precision(src, partial, gguf_type, name=name)
    return summary, file_type
