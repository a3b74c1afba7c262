"""Loading guards: an hf_astroquant checkpoint never loads into silently random weights.

1. Without the plugin, transformers skips the unknown `quantization_config` and would initialise
   every quantized Linear at random (only a warning). So the checkpoint also holds
   `<first quantized layer>.weight` as a 1-element tensor: a loader that builds plain Linear layers
   meets a size mismatch and raises (transformers' default `ignore_mismatched_sizes=False`). With
   the plugin that key is an expected leftover and ignored.
2. With the plugin, `check_checkpoint` reads the safetensors headers before any weight is loaded
   and refuses a checkpoint whose packed tensors are missing or have the wrong shape or dtype, or
   whose header is corrupt, naming the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..modules.gguf_linear import GGUFLinear
from ..modules.packing import packed_rows

GUARD_DTYPE = torch.float16
GUARD_METADATA = {"hf_astroquant": "packed weights in the 'astroquant' format: `import hf_astroquant` "
                                   "(pip install hf-astroquant) before from_pretrained"}


_EXPERT = re.compile(r"\.experts\.\d+\.")


def guard_key(quantized_modules: list[str] | None) -> str | None:
    """The first quantized module's ``.weight``, preferring one that is not an MoE expert: transformers
    merges a checkpoint's per-expert ``.weight`` tensors into the fused experts parameter, so a guard
    there would be renamed rather than refused."""
    if not quantized_modules:
        return None
    dense = [m for m in quantized_modules if not _EXPERT.search(m)]
    return f"{(dense or quantized_modules)[0]}.weight"


def guard_tensor() -> torch.Tensor:
    return torch.zeros(1, dtype=GUARD_DTYPE)


def ignore_pattern(key: str) -> str:
    return "^" + re.escape(key) + "$"


def expected_tensors(module_name: str, layer) -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors of one packed layer: name → (shape, dtype kind: 'int32' | 'uint8' | 'float')."""
    if isinstance(layer, GGUFLinear):  # one row of GGML blocks per output channel
        out = {f"{module_name}.qblocks": (tuple(layer.qblocks.shape), "uint8")}
        if layer.bias is not None:
            out[f"{module_name}.bias"] = ((layer.out_features,), "float")
        return out
    n_in, n_out, bits = layer.in_features, layer.out_features, layer.bits
    out = {
        f"{module_name}.qweight": ((packed_rows(n_in, bits), n_out), "int32"),
        f"{module_name}.qzeros": ((layer.n_groups, packed_rows(n_out, bits)), "int32"),
        f"{module_name}.scales": ((layer.n_groups, n_out), "float"),
        f"{module_name}.g_idx": ((n_in,), "int32"),
    }
    if layer.bias is not None:
        out[f"{module_name}.bias"] = ((n_out,), "float")
    if layer.input_rotation is not None:
        out[f"{module_name}.input_rotation.signs"] = ((n_in,), "float")
        out[f"{module_name}.input_rotation.mix"] = (tuple(layer.input_rotation.mix.shape), "float")
    return out


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def read_headers(files: list[str | Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name → (shape, safetensors dtype string) over all files; a corrupt file raises ValueError."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:
            raise ValueError(f"hf_astroquant: cannot read the safetensors file {file}: {err} "
                             "(truncated or corrupt download? delete it and download again)") from err
    return found


def saved_names(model, keys) -> dict[str, str]:
    """{state-dict key: the name save_pretrained writes it under}: transformers 5 renames some families'
    keys on save, back to their original checkpoints' layout (Gemma 3's multimodal model writes
    "model.language_model.X" as "language_model.model.X"). Identity where it renames nothing."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # another transformers: its loader reports missing tensors itself
        return {k: k for k in keys}
    marks = {k: torch.empty(0) for k in keys}  # one distinct tensor per key, to find it again after renaming
    by_mark = {id(t): k for k, t in marks.items()}
    return {by_mark[id(t)]: name for name, t in revert_weight_conversion(model, marks).items() if id(t) in by_mark}


def renamed_modules(model, modules: list[str]) -> dict[str, str] | None:
    """{module: the name save_pretrained writes its tensors under} for the `modules` it renames; None
    when it renames none."""
    saved = saved_names(model, [f"{m}.qweight" for m in modules])
    renamed = {k[:-len(".qweight")]: v[:-len(".qweight")] for k, v in saved.items() if k != v}
    return renamed or None


def _lookup(found: dict, key: str, prefix: str, saved: str | None = None):
    """The header entry of `key`, also when the checkpoint was saved from the bare base model
    (no "model." prefix) or from a task model (prefix) while loading the other, or under the name
    save_pretrained gave it (`saved`)."""
    for name in (key, saved, f"{prefix}.{key}" if prefix else None,
                 key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None):
        if name is not None and name in found:
            return found[name]
    return None


def check_checkpoint(files: list[str | Path], expected: dict[str, tuple[tuple[int, ...], str]],
                     prefix: str = "", saved: dict[str, str] | None = None) -> None:
    """Raise ValueError naming every missing or mismatched packed tensor (at most 5 listed); `saved`:
    the name each expected key is written under, when transformers renames it on save."""
    files = [f for f in files if str(f).endswith(".safetensors")]
    if not files:
        return  # .bin checkpoints: transformers' own loader reports them
    found = read_headers(files)
    problems = []
    for key, (shape, kind) in expected.items():
        entry = _lookup(found, key, prefix, (saved or {}).get(key))
        if entry is None:
            problems.append(f"{key}: missing")
            continue
        got_shape, got_dtype = entry
        if got_shape != shape:
            problems.append(f"{key}: shape {list(got_shape)}, expected {list(shape)}")
        elif kind == "int32" and got_dtype != "I32":
            problems.append(f"{key}: dtype {got_dtype}, expected I32")
        elif kind == "uint8" and got_dtype != "U8":
            problems.append(f"{key}: dtype {got_dtype}, expected U8")
        elif kind == "float" and got_dtype not in _FLOAT_DTYPES:
            problems.append(f"{key}: dtype {got_dtype}, expected a float type")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("hf_astroquant: this checkpoint does not match its quantization config; refusing to "
                         "load it (the layers would hold garbage): " + "; ".join(problems[:5]) + more)
