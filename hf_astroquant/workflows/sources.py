"""Model sources (a Hub id, a local directory or a local .gguf file), tokenizers, placement, and the
checks the shell's flag types make, for the workflows."""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..gguf import drop_gguf_marker, gguf_base_model_info

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class WorkflowError(ValueError):
    """A user error: one line naming the value and what to do (the shell prints it and exits with 2)."""


def resolve_source(model: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(path or id for from_pretrained, extra from_pretrained kwargs, base model info) for a Hub id, a
    local directory, or a local GGUF file."""
    from ..export.hub import base_model_info

    model = os.fspath(model)
    path = Path(model)
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise WorkflowError(f"GGUF file {model} does not exist")
        info = gguf_base_model_info(path)  # checks the header first: a hostile one is refused before any reader
        return str(path.parent), {"gguf_file": path.name}, info
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise WorkflowError(f"{model} is neither a model directory (with config.json) nor a .gguf file")
        return str(path), {}, base_model_info(model)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise WorkflowError(f"{model!r} is not an existing path, a .gguf file or a Hub model id")
    from .. import hub_access

    reason = hub_access.offline_unless_reachable()
    if reason:
        print(f"the Hugging Face Hub cannot be used ({reason}): {model} is read from the local cache only",
              file=sys.stderr)
    return model, {}, base_model_info(model)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _placement(device_map: str | None, max_memory, offload_folder) -> dict:
    """from_pretrained's device_map / max_memory / offload_folder; max_memory is {device: size} or the
    shell's ["DEVICE=SIZE", ...]."""
    kwargs: dict[str, Any] = {}
    if device_map:
        kwargs["device_map"] = device_map
    if max_memory:
        if isinstance(max_memory, Mapping):
            budget = dict(max_memory)
        else:
            budget = {}
            for item in [max_memory] if isinstance(max_memory, str) else max_memory:
                device, sep, size = item.partition("=")
                if not sep or not device or not size:
                    raise WorkflowError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. cpu=8GiB or 0=20GiB")
                budget[int(device) if device.isdigit() else device] = size
        kwargs["max_memory"] = budget
        kwargs.setdefault("device_map", "auto")
    if offload_folder:
        if Path(offload_folder).exists() and not Path(offload_folder).is_dir():
            raise WorkflowError(f"--offload-folder {offload_folder} exists and is not a directory")
        kwargs["offload_folder"] = offload_folder
    return kwargs


def _load_fp(source: str, load_kwargs: dict, dtype: str, placement: dict):
    from transformers import AutoModelForCausalLM

    kwargs = dict(load_kwargs, dtype=_torch_dtype(dtype), **copy.deepcopy(placement))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return drop_gguf_marker(model) if "gguf_file" in load_kwargs else model


def _load_tokenizer(name: str, load_kwargs: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **{k: v for k, v in load_kwargs.items() if k == "gguf_file"})


def _tokenizer_of(name: str, shown: str, load_kwargs: dict, needed: bool):
    """The tokenizer `name` (shown to the user as `shown`); when it cannot be loaded, a one-line error if
    the run `needed` it (text calibration data, evaluation), else a note and None (saved without one)."""
    try:
        return _load_tokenizer(name, load_kwargs)
    except (OSError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
            reason = f"the directory has none of {', '.join(TOKENIZER_FILES)}"
        if needed:
            raise WorkflowError(f"cannot load the tokenizer of {shown!r} ({reason}); pass --tokenizer NAME_OR_DIR"
                                ) from err
        print(f"hf-astroquant: no tokenizer saved with the model: cannot load the tokenizer of {shown!r} ({reason})",
              file=sys.stderr)
        return None


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _check_run_arguments(dtype: str, **counts: int | None) -> None:
    """What the shell's flag types check, for Python callers: a known dtype, counts >= 1 (None: unset)."""
    if dtype not in DTYPES:
        raise WorkflowError(f"dtype={dtype!r} is not valid; allowed: {', '.join(DTYPES)}")
    for name, value in counts.items():
        if value is not None and (type(value) is not int or value < 1):
            raise WorkflowError(f"{name}={value!r} is not valid; allowed: a positive integer (>= 1)")


