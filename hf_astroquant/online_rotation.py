"""online_rotation="down": each MLP's output projection reads its input rotated online; "writers":
the attention's output projection (o_proj) too, i.e. every Linear that writes the residual stream.

The MLP's hidden activations act(gate)·up have a few channels far larger than the rest; no rotation
folds between up_proj and down_proj (the product is not linear in a rotated basis), so the
residual-stream rotation (transform="rotate") leaves them. Here the down projection's weight
becomes W·R before calibration and the layer computes (x·R)·(W·R)ᵀ = x·Wᵀ: its statistics, its
solve and the packed layer all see the rotated input, R = diag(s)·(A ⊗ H_a ⊗ H_b)
(algorithms/kron_rotation.py), one per width, seeded by `seed`. The packed layer stores s and A
(modules/input_rotation.py) and rotates its input at inference, at m + a + b multiply-adds per
input element. Formats without an online rotation (GPTQ, compressed-tensors and GGUF exports) refuse
such a checkpoint. (With "writers", o_proj's input, the attention heads' outputs side by side, is
mixed across heads, where transform="rotate" folds a rotation within each head only.)

During calibration the rotation runs as a forward pre-hook of the full-precision Linear (first
among its hooks, so every statistic sees the rotated input); the solved layer takes it over
(`input_rotation_of`). A Linear the run leaves in full precision gets its weight back (W·R·Rᵀ).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import offload
from .adapters import output_projections
from .blocks import text_config
from .modules.input_rotation import InputRotation

logger = logging.getLogger("hf_astroquant")

ONLINE_ROTATIONS = ("none", "down", "writers")
_ROTATION = "_astroquant_input_rotation"  # a plain attribute of the Linear (not a submodule of it)
_HOOK = "_astroquant_input_rotation_hook"
_SEED_OFFSET = 7717  # the online rotation's seed, apart from the residual rotation's


class NothingToRotate(ValueError):
    """The model has no output projection that online_rotation would rotate; `reason` says so without the advice."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def rotate_inputs(model: nn.Module, blocks, names: list[str], should_convert, seed: int, mode: str = "down") -> list[str]:
    """Give every output projection `mode` names ("down": the MLPs'; "writers": the attention's too) that
    will be quantized an online input rotation; return their names. A ValueError when the model has
    none, or one of them is offloaded (its weight is not in memory)."""
    config = text_config(model)
    rotations: dict[int, InputRotation] = {}
    rotated = []
    for name, block in zip(names, blocks):
        for path, linear in output_projections(block, config, attention=mode == "writers").items():
            full = f"{name}.{path}"
            if not should_convert(full):
                continue
            if offload.is_offloaded(linear) or linear.weight.device.type == "meta":
                raise ValueError(f"online_rotation={mode!r} rotates {full}'s weight before calibration, but it is "
                                 "offloaded (device_map with cpu/disk entries); use online_rotation='none'")
            n = linear.in_features
            if n not in rotations:
                rotations[n] = InputRotation.random(n, seed + _SEED_OFFSET).to(linear.weight.device)
            attach(linear, rotations[n])
            rotated.append(full)
    if not rotated:
        reason = (f"online_rotation={mode!r}: {type(model).__name__} ({getattr(config, 'model_type', '?')}) has no "
                  "dense MLP output projection to rotate among the modules being quantized (routed experts are not "
                  "rotated)")
        raise NothingToRotate(f"{reason}; use online_rotation='none'", reason)
    logger.info("astroquant: online input rotation on %d output projections", len(rotated))
    return rotated


@torch.no_grad()
def attach(linear: nn.Linear, rotation: InputRotation) -> None:
    """W ← W·R, and x ↦ x·R before every forward of `linear` (ahead of any other pre-hook)."""
    linear.weight.data = rotation.fold_into(linear.weight.data)
    _read_through(linear, rotation)


def _read_through(linear: nn.Linear, rotation: InputRotation) -> None:
    linear.__dict__[_ROTATION] = rotation
    linear.__dict__[_HOOK] = linear.register_forward_pre_hook(
        lambda module, args: (rotation(args[0]), *args[1:]), prepend=True)


def input_rotation_of(linear: nn.Module) -> InputRotation | None:
    """The online rotation a full-precision Linear was given (`attach`), or None."""
    return linear.__dict__.get(_ROTATION)


@torch.no_grad()
def detach_left_in_full_precision(model: nn.Module) -> list[str]:
    """Undo `attach` on every Linear still in full precision (W·R·Rᵀ = W); return their names."""
    undone = []
    for name, module in model.named_modules():
        rotation = module.__dict__.pop(_ROTATION, None)
        if rotation is None:
            continue
        module.__dict__.pop(_HOOK).remove()
        module.weight.data = rotation.fold_into(module.weight.data, inverse=True)
        undone.append(name)
    return undone
