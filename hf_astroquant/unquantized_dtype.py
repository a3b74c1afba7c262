"""The dtype of the tensors a quantized checkpoint keeps unquantized (embeddings, lm_head, norms, routers).

Calibration runs in the dtype the model was loaded in (float32 by default), but a user who
quantizes a bfloat16 checkpoint expects the unquantized tensors back in bfloat16: for an 8B model
with a 128k vocabulary, float32 embeddings are 2 GB more than the source's. So, with
`unquantized_dtype` None (auto), they are saved in the source checkpoint's dtype: the floating dtype
most of its tensors are stored in (read from the safetensors headers, no tensor loaded). A name
("bfloat16", "float16", "float32") sets it.

Saving rounds each such tensor to that dtype; so that a reload gives the model the run left in
memory, bit for bit, `round_in_memory` rounds the in-memory values the same way at the end of the
run (the tensors keep their storage dtype: the forward pass is computed as before, on values the
checkpoint holds exactly). Only narrowing is done: a float32 target leaves a bfloat16 model as it is.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def source_dtype(headers: dict[str, tuple[tuple[int, ...], str]]) -> torch.dtype | None:
    """The floating dtype that holds the most elements among a checkpoint's tensors (`guard.read_headers`'
    name → (shape, safetensors dtype)); None when it holds none (e.g. a GGUF or in-memory source)."""
    elements: Counter = Counter()
    for shape, kind in headers.values():
        if kind in _SAFETENSORS:
            elements[_SAFETENSORS[kind]] += math.prod(shape)
    return elements.most_common(1)[0][0] if elements else None


def resolve(option: str | None, source: torch.dtype | None) -> torch.dtype | None:
    """The dtype to save unquantized tensors in: the option's, else the source's (None: keep each tensor's)."""
    if option is not None:
        return DTYPES[option]
    return source if source in DTYPES.values() else None


def name_of(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def narrows(tensor: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether saving `tensor` in `dtype` rounds it: a floating tensor wider than `dtype`, or as wide in
    another format (float16 against bfloat16)."""
    return (dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
            and tensor.element_size() >= dtype.itemsize)


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; a ValueError names the tensor when a finite value does not fit (float16's range)."""
    out = tensor.to(dtype)
    if bool(torch.isfinite(tensor).all()) and not bool(torch.isfinite(out).all()):
        largest = float(tensor.abs().max())
        raise ValueError(
            f"unquantized_dtype={name_of(dtype)!r}: {name} holds values up to {largest:.4g}, beyond "
            f"{name_of(dtype)}'s range; use unquantized_dtype='bfloat16' or 'float32'")
    return out


def unquantized_keys(state_dict: dict[str, torch.Tensor], quantized_modules: list[str] | None) -> list[str]:
    """The state-dict keys of tensors outside the packed layers (whose own tensors keep their format)."""
    packed = set(quantized_modules or ())
    return [k for k in state_dict if k.rpartition(".")[0] not in packed]


def cast_state_dict(state_dict: dict[str, torch.Tensor], quantized_modules: list[str] | None,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict to save: unquantized floating tensors in `dtype` where that narrows them. Tensors that
    share storage (tied embeddings) share their cast too, so the save still stores them once."""
    out, casts = dict(state_dict), {}
    for key in unquantized_keys(state_dict, quantized_modules):
        t = state_dict[key]
        if narrows(t, dtype) and t.device.type != "meta":  # (offloaded: round_in_memory)
            same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if same not in casts:
                casts[same] = cast(key, t, dtype)
            out[key] = casts[same]
    return out


def round_in_memory(model: nn.Module, packed_types: tuple[type, ...], dtype: torch.dtype | None) -> list[str]:
    """Round every unquantized parameter and persistent buffer of `model` to the values `dtype` holds,
    in place, keeping its storage dtype; an offloaded tensor is stored in `dtype` in accelerate's weights
    map. The names of those whose values changed."""
    from .offload import OffloadedLinear, offload_hook

    if dtype is None:
        return []
    changed = []
    for module_name, module in model.named_modules():
        if isinstance(module, packed_types):
            continue
        hook = offload_hook(module)
        persistent = [n for n, _ in module.named_buffers(recurse=False)
                      if n not in getattr(module, "_non_persistent_buffers_set", ())]
        for local in [n for n, _ in module.named_parameters(recurse=False)] + persistent:
            name = f"{module_name}.{local}" if module_name else local
            tensor = getattr(module, local)
            if tensor is None:
                continue
            if tensor.device.type == "meta" and hook is not None and local in hook.weights_map:
                stored = hook.weights_map[local]
                if narrows(stored, dtype):  # kept in `dtype` there: accelerate casts it to the module's
                    # dtype on each load, and transformers' save reads it from there as it is
                    narrow = cast(name, stored, dtype)
                    OffloadedLinear(hook, name, local).put(local, narrow)
                    if not torch.equal(narrow.to(stored.dtype), stored):
                        changed.append(name)
                continue
            if tensor.device.type != "meta" and narrows(tensor, dtype):
                rounded = cast(name, tensor.detach(), dtype).to(tensor.dtype)
                if not torch.equal(rounded, tensor):
                    with torch.no_grad():
                        tensor.copy_(rounded)
                    changed.append(name)
    return changed
