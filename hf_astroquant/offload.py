"""Calibration of models that accelerate dispatched (``device_map="auto"``, ``max_memory``, CPU or
disk offload).

transformers gives an offloaded leaf module an accelerate ``AlignDevicesHook(offload=True)`` whose
``weights_map`` (a ``PrefixedDataset`` over an ``OffloadedWeightsLoader`` or a dict) holds the
tensors; the module's own tensors sit on ``meta`` and are loaded to the hook's execution device
around each forward. For one block at a time the pipeline:

  1. `onload`: loads the block's target Linears onto the execution device and takes their hooks
     off, so the solver can rewrite their weights and the forward passes see the rewritten values
     (a hook would reload the original weights before every forward);
  2. calibrates, solves and packs the block as usual;
  3. `offload`: writes the packed tensors back where the Linear's weights lived (the loader's CPU
     state dict, or ``<offload folder>/<name>.dat`` on disk), and hooks the packed module with
     ``offload_buffers=True`` so its buffers go back to ``meta`` (transformers' default hooks keep
     buffers resident, which would pin every packed layer in memory).

So only the block being quantized, its activations and its statistics are resident; the rest of
the model stays where accelerate put it, and `save_pretrained` reads the packed tensors back
through the hooks as it does for any offloaded weight.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks on `module` itself, a SequentialHook unpacked."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def offload_hook(module: nn.Module):
    """The module's own offloading `AlignDevicesHook`, or None."""
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_offloaded(module: nn.Module) -> bool:
    return offload_hook(module) is not None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: the hook's execution device when accelerate dispatched it,
    else the device of its first tensor that is not on meta, else the CPU."""
    for m in module.modules():
        for h in _hooks(m):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    if any(True for _ in module.parameters()):
        raise ValueError(
            f"{type(module).__name__} has weights on the meta device and no accelerate hook to load them; "
            "load the model with a device_map (and offload_folder for disk offload), not on meta"
        )
    return torch.device("cpu")


class OffloadedLinear:
    """Where an offloaded Linear's tensors live: the hook's weights map and the key prefix."""

    def __init__(self, hook, full_name: str, key: str = "weight"):
        from accelerate.utils import OffloadedWeightsLoader

        self.weights_map = hook.weights_map
        self.device = hook.execution_device
        self.full_name = full_name
        store, prefix = self._store()
        # Disk when the loader holds the tensor `key` in its index rather than in its CPU state dict.
        self.on_disk = (isinstance(store, OffloadedWeightsLoader) and prefix + key not in store.state_dict
                        and store.save_folder is not None)

    def beside(self, full_name: str, local_prefix: str) -> "OffloadedLinear":
        """The home of a new module whose tensors go next to this one's, under `local_prefix` (an
        expert's Linear split from a fused experts module: ``"3.gate_proj."``)."""
        from accelerate.utils import PrefixedDataset

        store, prefix = self._store()
        home = object.__new__(OffloadedLinear)
        home.weights_map, home.device, home.full_name = PrefixedDataset(store, prefix + local_prefix), self.device, full_name
        home.on_disk = self.on_disk
        return home

    def _store(self):
        store = getattr(self.weights_map, "dataset", self.weights_map)
        prefix = getattr(self.weights_map, "prefix", "")
        return store, prefix

    def put(self, local_name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the packed module next to where the Linear's weight was."""
        from accelerate.utils import OffloadedWeightsLoader, offload_weight

        store, prefix = self._store()
        key = prefix + local_name
        tensor = tensor.detach()
        if isinstance(store, OffloadedWeightsLoader):
            if self.on_disk:
                os.makedirs(store.save_folder, exist_ok=True)
                offload_weight(tensor.cpu(), key, store.save_folder, index=store.index)
                store.state_dict.pop(key, None)
            else:
                store.state_dict[key] = tensor.to("cpu", copy=True)
            if key not in store.all_keys:
                store.all_keys.append(key)
        elif isinstance(store, MutableMapping):
            store[key] = tensor.to("cpu", copy=True)
        else:
            raise TypeError(f"cannot write the packed {self.full_name} back to an offload store of type "
                            f"{type(store).__name__}")

    def drop(self, local_names) -> None:
        """Forget the full-precision tensors (frees them when they were held in CPU memory)."""
        from accelerate.utils import OffloadedWeightsLoader

        store, prefix = self._store()
        if isinstance(store, OffloadedWeightsLoader):
            for n in local_names:
                store.state_dict.pop(prefix + n, None)
        elif isinstance(store, MutableMapping):
            for n in local_names:
                store.pop(prefix + n, None)


def onload(targets: dict[str, nn.Linear], load: bool = True) -> dict[str, OffloadedLinear]:
    """Load every offloaded target Linear onto its execution device (only take the hook off when
    `load` is False: a resumed block replaces it without reading it) and remove its hook; return
    where each one's tensors live, for `offload`."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    homes = {}
    for name, linear in targets.items():
        hook = offload_hook(linear)
        if hook is None:
            continue
        homes[name] = OffloadedLinear(hook, name)
        values = {n: hook.weights_map[n] for n, _ in linear.named_parameters(recurse=False)} if load else {}
        remove_hook_from_module(linear)
        for n, value in values.items():
            set_module_tensor_to_device(linear, n, hook.execution_device, value=value)
    return homes


def offload(module: nn.Module, home: OffloadedLinear) -> None:
    """Write `module`'s tensors (the packed layer that replaces an offloaded Linear) to the
    Linear's offload store and hook it so they are loaded only around its forward."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    home.drop(["weight", "bias"])
    for n, t in list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False)):
        home.put(n, t)
    hook = AlignDevicesHook(execution_device=home.device, offload=True, weights_map=home.weights_map,
                            offload_buffers=True)
    add_hook_to_module(module, hook)


def restore(linear: nn.Linear, home: OffloadedLinear) -> None:
    """Hook an onloaded Linear that stays in full precision back to its unchanged offloaded weights."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(linear, AlignDevicesHook(execution_device=home.device, offload=True,
                                                weights_map=home.weights_map))
