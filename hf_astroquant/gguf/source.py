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
    and `license` for a GGUF file. A file whose header is corrupt or hostile raises GGUFFileError (a
    ValueError, one line) before gguf-py reads it; without gguf-py installed nothing more is known."""
    from ..export.hub import hub_id_of
    from .header import GGUFFileError, check_gguf_file

    info = {"source": Path(path).name, "base_model": None, "license": None}
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers cannot read the file without gguf-py either, and says so
        return info
    check_gguf_file(path)
    try:
        fields = GGUFReader(str(path)).fields
    except Exception as err:  # a header we accepted but gguf-py refuses: still one line
        raise GGUFFileError(f"{path}: gguf-py cannot read it: {type(err).__name__}: {err}") from err
    field = fields.get("general.license")
    info["license"] = _text(field)
    for key in _SOURCE_KEYS:
        field = fields.get(key)
        hub_id = hub_id_of(_text(field))
        if hub_id:
            info["base_model"] = hub_id
            break
    return info


def _text(field) -> str | None:
    """A GGUF field's value when it is one string (the checked header guarantees UTF-8), else None."""
    from .header import STRING

    if field is None or len(field.types) != 1 or int(field.types[0]) != STRING:
        return None
    return field.contents()
