"""Crash-safe calibration: a checkpoint after every finished block, and a restart from the last one.

Layout of ``resume_dir``:

  state.json                 what is finished: {"format", "fingerprint", "blocks_done", "report"}
  block_00000.safetensors    the packed tensors of block 0 (``<module name>.<buffer>``)
  stream_00002.safetensors   the inputs of block 2: the quantized stream ``q.<batch>`` and, for
                             the asymmetric solvers, the full-precision stream ``fp.<batch>``

Every file is written to a temporary name and renamed into place, and ``state.json`` is renamed
last, so a run killed at any instant leaves a directory that describes only complete blocks;
the next run with the same directory reloads those blocks and the stream after them and goes
on. The stream is saved exactly, and the rest of the computation does not depend on how it
was reached, so a resumed run produces the same bits as an uninterrupted one.

The fingerprint (options that change the result, a hash of the calibration windows and of the
model) makes a run refuse a directory that another model, config or dataset wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import offload
from .blocks import block_targets, place_layer
from .experts import onload_experts
from .modules import empty_layer

if TYPE_CHECKING:
    from .config import AstroQuantConfig

logger = logging.getLogger("hf_astroquant")

FORMAT = 1
_STATE = "state.json"
# Options that do not change the quantized weights, so a resume may differ in them.
_NOT_FINGERPRINTED = ("backend", "resume_dir", "calibration", "quantized_modules")


@contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside `path`; once the body has written it, fsync and rename it into
    place, so readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with _atomic(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def fingerprint(cfg, model, windows: list[torch.Tensor], batch_size: int, sample: torch.Tensor | None) -> dict:
    """What must match for a resume: result-changing options, the data, the model.

    `sample` is a tensor of the model's weights (a strided sample of the input embedding), so a
    different checkpoint of the same architecture is caught."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED}
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    model_config.pop("quantization_config", None)
    model_config.pop("transformers_version", None)
    return {
        "options": json.loads(json.dumps(options, sort_keys=True, default=str)),
        "calibration": _digest(windows) + f"/batch={batch_size}",
        "model": type(model).__name__ + "/" + hashlib.sha256(
            json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
            + ("" if sample is None else "/" + _digest([sample])),
    }


class ResumeDir:
    """Reads and writes one resume directory."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"resume_dir={str(path)!r} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.tmp"):  # a write that a killed run left unfinished
            stale.unlink()

    def load(self) -> dict | None:
        """The finished state, or None for a fresh directory; refuses another run's directory."""
        state_file = self.path / _STATE
        if not state_file.exists():
            return None
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"resume_dir {str(self.path)!r}: {_STATE} is unreadable ({exc}); delete the "
                             "directory to start over") from None
        if state.get("format") != FORMAT:
            raise ValueError(f"resume_dir {str(self.path)!r} was written in format {state.get('format')!r}; "
                             f"this version reads format {FORMAT}. Delete it to start over.")
        theirs = state.get("fingerprint", {})
        differ = [k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]]
        if differ:
            parts = []
            for k in differ:
                if k == "options":
                    a, b = theirs.get("options", {}), self.fingerprint["options"]
                    keys = sorted(o for o in set(a) | set(b) if a.get(o) != b.get(o))
                    parts.append("options (" + ", ".join(f"{o}: {a.get(o)!r} -> {b.get(o)!r}" for o in keys) + ")")
                else:
                    parts.append({"calibration": "calibration data or batch size"}.get(k, k))
            raise ValueError(
                f"resume_dir {str(self.path)!r} holds a run with different {', '.join(parts)}; "
                "use another resume_dir, or delete this one to start over"
            )
        return state

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"block_{index:05d}.safetensors"))

    def stream(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The quantized and full-precision inputs of block `index`, per batch."""
        tensors = load_file(str(self.path / f"stream_{index:05d}.safetensors"))
        q = [tensors[f"q.{b}"] for b in range(sum(k.startswith("q.") for k in tensors))]
        n_fp = sum(k.startswith("fp.") for k in tensors)
        return q, ([tensors[f"fp.{b}"] for b in range(n_fp)] if n_fp else None)

    def save_block(self, index: int, packed: dict[str, torch.Tensor], next_inputs: list[torch.Tensor] | None,
                   next_fp_inputs: list[torch.Tensor] | None, report: dict[str, Any], n_blocks: int) -> None:
        """Record block `index` as finished: its packed tensors, the inputs of the next block, the
        report so far; then drop the stream the previous checkpoint needed."""
        atomic_save_tensors(packed, self.path / f"block_{index:05d}.safetensors")
        last = index + 1 == n_blocks
        if next_inputs is not None and not last:
            stream = {f"q.{b}": x for b, x in enumerate(next_inputs)}
            stream.update({f"fp.{b}": x for b, x in enumerate(next_fp_inputs or [])})
            atomic_save_tensors(stream, self.path / f"stream_{index + 1:05d}.safetensors")
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "blocks_done": index + 1,
                 "n_blocks": n_blocks, "report": report}
        atomic_write_bytes(self.path / _STATE, json.dumps(state, indent=1).encode())
        for old in self.path.glob("stream_*.safetensors"):
            if last or old.name != f"stream_{index + 1:05d}.safetensors":
                old.unlink()


def embedding_sample(model: nn.Module) -> torch.Tensor | None:
    """A strided sample of the input embedding's weights (read through accelerate's hook when
    offloaded): enough to tell two checkpoints of one architecture apart."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None:
        return None
    weight = emb.weight
    if weight.device.type == "meta":
        hook = offload.offload_hook(emb)
        if hook is None:
            return None
        weight = hook.weights_map["weight"]
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)].float().cpu()


def load_block(model: nn.Module, name: str, block: nn.Module, should_convert, cfg: AstroQuantConfig,
                tensors: dict[str, torch.Tensor]) -> None:
    """Swap in the packed layers a checkpoint holds for one block."""
    targets = block_targets(name, block, should_convert)
    homes = {**onload_experts(block, name, load=False), **offload.onload(targets, load=False)}
    device = offload.execution_device(block)
    for lname, linear in targets.items():
        own = {k[len(lname) + 1:]: v for k, v in tensors.items() if k.startswith(lname + ".")}
        if "qweight" not in own and "qblocks" not in own:  # the run left this one in full precision
            if lname in homes:
                offload.restore(linear, homes[lname])
            continue
        bias = own.get("bias")
        layer = empty_layer(linear.in_features, linear.out_features, cfg, cfg.tensor_type_of(lname), bias is not None,
                            dtype=None if bias is None else bias.dtype, device=device,
                            rotated_input=any(k.startswith("input_rotation.") for k in own))
        layer.load_state_dict({k: v.to(device) for k, v in own.items()})
        place_layer(model, lname, layer, homes)
