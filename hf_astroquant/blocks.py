"""The model's decoder blocks and the Linears inside them: finding, naming, replacing."""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import offload
from .modules import QuantLinear

def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks (e.g. ``model.layers``), found with optimum's block patterns."""
    from optimum.gptq.utils import get_block_name_with_pattern

    try:
        name = get_block_name_with_pattern(model)
    except ValueError as exc:
        raise ValueError(f"hf_astroquant cannot find the decoder blocks of {type(model).__name__}: {exc}") from exc
    return name, model.get_submodule(name)


def path_in_block(block_name: str, name: str) -> str:
    """The path, inside the block `block_name`, of the module the model names `name`."""
    return name[len(block_name) + 1:] if block_name else name


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def block_targets(block_name: str, block: nn.Module, should_convert: Callable[[str], bool]) -> dict[str, nn.Linear]:
    """Linears of one block to quantize, by full module name (its Conv1D layers were made Linears
    first: linear_like.convert_conv1d)."""
    return {
        f"{block_name}.{rel}": mod
        for rel, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and should_convert(f"{block_name}.{rel}")
    }


def text_config(model: nn.Module):
    """The language model's config: a multimodal model's text_config, else the model's own (or None)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def place_layer(model: nn.Module, name: str, layer: QuantLinear, homes: dict, record: dict | None = None) -> None:
    """Put the packed `layer` in place of the Linear `name`, back where that Linear's weights lived;
    `record` (a checkpoint's tensors) gets its tensors first: offloading leaves them on meta."""
    if record is not None:
        record.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    set_submodule(model, name, layer)
    if name in homes:
        offload.offload(layer, homes[name])
