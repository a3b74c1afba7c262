"""GGUF sources: transformers de-quantizes a .gguf file into a full-precision model but leaves a
GGUF quantization marker on it; these helpers make it a plain model and read its licence and source."""

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


# GGUF keys that name the model a file was converted from (llama.cpp's convert_hf_to_gguf writes them
# when it knows; most files carry none).
_SOURCE_KEYS = ("general.source.huggingface.repository", "general.source.url", "general.base_model.0.repo_url",
                "general.url")


def gguf_base_model_info(path: str | Path) -> dict:
    """The card's `source` (the file's name), `base_model` (a Hub id, when the metadata names one)
    and `license` for a GGUF file."""
    from .export.hub import hub_id_of

    info = {"source": Path(path).name, "base_model": None, "license": None}
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except Exception:  # gguf not installed or an old file: nothing more is known
        return info
    field = fields.get("general.license")
    info["license"] = field.contents() if field is not None else None
    for key in _SOURCE_KEYS:
        field = fields.get(key)
        hub_id = hub_id_of(field.contents()) if field is not None else None
        if hub_id:
            info["base_model"] = hub_id
            break
    return info
