"""GGUF sources: transformers de-quantizes a .gguf file into a full-precision model but leaves a
GGUF quantization marker on it; these helpers make it a plain model and read its licence."""

from __future__ import annotations

from pathlib import Path


def drop_gguf_marker(model):
    """Make a model loaded with `gguf_file=` a plain full-precision model (so it can be saved as one
    or quantized), in place; returns it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


def gguf_license(path: str | Path) -> str | None:
    """The `general.license` metadata of a GGUF file, or None (not recorded, or `gguf` not installed)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        return field.contents() if field is not None else None
    except Exception:  # gguf not installed or an old file: the licence stays unknown
        return None
