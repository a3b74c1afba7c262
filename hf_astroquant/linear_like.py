"""Layers that compute y = x·Wᵀ + b but are not nn.Linear: transformers' Conv1D (GPT-2, GPT-J's
relatives) stores W transposed, (in, out). Before calibration each one inside the decoder blocks
becomes the nn.Linear it is (weight transposed once), so every solver, hook and packed layer sees one
convention; a checkpoint's packed layers load into either."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_LIKE = (nn.Linear, Conv1D)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def as_linear(conv: Conv1D) -> nn.Linear:
    """The nn.Linear that computes what `conv` computes: weight = conv.weightᵀ, same bias, dtype, device."""
    w = conv.weight
    if w.device.type == "meta":
        raise ValueError(f"{conv!r} has no weights in memory (offloaded to disk or meta): transformers' Conv1D "
                         "layers are converted to nn.Linear before calibration and cannot be offloaded")
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def convert_conv1d(root: nn.Module, prefix: str, should_convert) -> list[str]:
    """Replace every Conv1D under `root` (named `prefix`) that `should_convert(full name)` accepts by its
    nn.Linear, in place; returns the full names replaced."""
    names = [n for n, m in root.named_modules() if isinstance(m, Conv1D) and should_convert(f"{prefix}.{n}")]
    for name in names:
        root.set_submodule(name, as_linear(root.get_submodule(name)))
    return [f"{prefix}.{n}" for n in names]
