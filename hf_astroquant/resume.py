"""Crash-safe calibration: a checkpoint after every finished block, and a restart from the last one.

Layout of ``resume_dir``:

  state.json                 what is finished: {"format", "fingerprint", "blocks_done", "n_blocks",
                             "blocks" (the weights digest of every finished block, by name),
                             "files" (the size and digest of every file below that it refers to),
                             "report"}
  block_00000.safetensors    the packed tensors of block 0 (``<module name>.<buffer>``)
  stream_00002.safetensors   the inputs of block 2: the quantized stream ``q.<batch>`` and, for
                             the asymmetric solvers, the full-precision stream ``fp.<batch>``
                             (under torch.distributed one file per rank, ``stream_00002.rank001…``,
                             each rank's share of the windows; rank 0 writes the rest)

Every file is written to a temporary name and renamed into place, and ``state.json`` is renamed
last, so a run killed at any instant leaves a directory that describes only complete blocks;
the next run with the same directory reloads those blocks and the stream after them and goes
on. The stream is saved exactly, and the rest of the computation does not depend on how it
was reached, so a resumed run produces the same bits as an uninterrupted one.

Identity is by content, not by path. The fingerprint holds what decides the result: the options
that change it, a hash of the calibration windows, the dtype the weights were loaded in, the
model's class and config (less its path, transformers version and quantization config) and the
content digest of every weight outside the decoder blocks (embeddings, final norm, lm_head: small
beside the blocks). A block's own weights are hashed by the block loop when it starts on the
block, where they are in memory anyway (onloaded, for an offloaded model), and the digest is
recorded with the finished block; a resumed run hashes each finished block before it takes the
block's packed layers from here (reading its weights, through accelerate's hooks when offloaded:
far cheaper than solving it) and refuses the directory if one differs. The blocks after the last
finished one are not compared with anything: nothing recorded depends on them (a block's result
depends on the weights before it and its own, never on later ones), so a resumed run whose
later blocks changed gives what a fresh run on the changed model gives.

Every file the state refers to is checked (size, then digest) before it is used, and a damaged
or unreadable one is refused naming the file.

Digests: `digests.py`.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import offload
from .blocks import block_targets, place_layer
from .distributed import Ranks
from .digests import combined_digest, file_digest, stored_weights, tensor_digest, weights_digests
from .experts import onload_experts
from .checkpoint import validate
from .modules import empty_layer

if TYPE_CHECKING:
    from .config import AstroQuantConfig

logger = logging.getLogger("hf_astroquant")

FORMAT = 2  # 2: identity by content (weights digests, per-file digests)
_STATE = "state.json"
# Keys of the saved config that a run fills in itself (what the data was, what it quantized): not what
# it was asked. (Options that are not saved, backend and resume_dir among them, are not in it at all.)
_NOT_FINGERPRINTED = ("calibration", "quantized_modules", "unquantized_dtype")  # (the last applies after the blocks)
# Keys of the model's config that say where it came from rather than what it computes (the load
# dtype is its own entry of the fingerprint, read off the weights).
_CONFIG_NOT_FINGERPRINTED = ("_name_or_path", "name_or_path", "transformers_version", "quantization_config",
                             "dtype", "torch_dtype", "_commit_hash")


def _json(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _model_config(model: nn.Module) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _CONFIG_NOT_FINGERPRINTED}
        return value

    return strip(model.config.to_dict()) if hasattr(model, "config") else {}


def weights_dtype(model: nn.Module) -> str:
    """The dtype(s) of the model's floating-point weights, as loaded ("bfloat16", "bfloat16+float32")."""
    return "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}))


def fingerprint(cfg, model: nn.Module, windows: list[torch.Tensor], batch_size: int,
                blocks: Iterable[nn.Module], world_size: int = 1) -> dict:
    """What must match for a resume: result-changing options, the data, the load dtype, the model's
    class and config, and the content of its weights outside `blocks` (the blocks' own are checked
    block by block: `block_digest`); under torch.distributed also the number of ranks (each holds its
    own share of the stream)."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED}
    windows_digest = combined_digest({str(i): tensor_digest("", w) for i, w in enumerate(windows)})
    ranks = {"world_size": world_size} if world_size > 1 else {}
    return _json({
        **ranks,
        "options": options,
        "calibration": windows_digest[:32] + f"/batch={batch_size}",
        "dtype": weights_dtype(model),
        "model": {"class": type(model).__name__, "config": _model_config(model),
                  "weights": weights_digests(stored_weights(model, skip=blocks))},
    })


def _changes(a: dict, b: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else []))


def _differences(theirs: dict, ours: dict) -> list[str]:
    """What differs between a recorded fingerprint and this run's, in words."""
    parts = []
    if theirs.get("options") != ours["options"]:
        parts.append("options (" + _changes(theirs.get("options") or {}, ours["options"]) + ")")
    if theirs.get("calibration") != ours["calibration"]:
        parts.append("calibration data or batch size")
    if theirs.get("dtype") != ours["dtype"]:
        parts.append(f"dtype ({theirs.get('dtype')} -> {ours['dtype']})")
    if theirs.get("world_size", 1) != ours.get("world_size", 1):
        parts.append(f"number of ranks ({theirs.get('world_size', 1)} -> {ours.get('world_size', 1)}: each rank's share "
                     "of the stream is its own; resume with the same torchrun --nproc-per-node)")
    a, b = theirs.get("model") if isinstance(theirs.get("model"), dict) else {}, ours["model"]
    if a.get("class") != b["class"]:
        parts.append(f"model class ({a.get('class')} -> {b['class']})")
    elif a.get("config") != b["config"]:
        parts.append("model config (" + _changes(a.get("config") or {}, b["config"]) + ")")
    elif a.get("weights") != b["weights"] and theirs.get("dtype") == ours["dtype"]:
        w_a, w_b = a.get("weights") or {}, b["weights"]
        names = sorted(n for n in set(w_a) | set(w_b) if w_a.get(n) != w_b.get(n))
        parts.append("model weights (" + ", ".join(names[:4]) + (f", {len(names) - 4} more" if len(names) > 4
                                                                 else "") + ")")
    return parts


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


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write `tensors` to `path` atomically; return the file's record for state.json {"size", "digest"}
    (of the bytes on disk, read back once written)."""
    with _atomic(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        size, digest = file_digest(tmp)
    return {"size": size, "digest": digest}


def _validate(state) -> str | None:
    """Why a parsed state.json cannot be this format's, or None."""
    if not isinstance(state, dict):
        return "not an object"
    done, n = state.get("blocks_done"), state.get("n_blocks")
    if not isinstance(done, int) or not isinstance(n, int) or not 0 <= done <= n:
        return "blocks_done/n_blocks"
    for key in ("blocks", "files", "fingerprint", "report"):
        if not isinstance(state.get(key), dict):
            return key
    for rec in state["files"].values():
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("digest"), str)):
            return "files"
    return None


class ResumeDir:
    """Reads and writes one resume directory."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, ranks: Ranks | None = None):
        """`ranks`: under torch.distributed every rank reads the directory and writes its own share of the
        stream; rank 0 writes the rest (the blocks, state.json) once every rank's share is written."""
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.ranks = ranks or Ranks()
        self.blocks: dict[str, str] = {}  # block name -> weights digest, of the finished blocks
        self.files: dict[str, dict] = {}  # file name -> {"size", "digest"}, of the files state.json refers to
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"resume_dir={str(path)!r} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.ranks.is_writer:
            for stale in self.path.glob("*.tmp"):  # a write that a killed run left unfinished
                stale.unlink()
        self.ranks.barrier()  # (no rank writes before the stale files are gone)

    def _where(self) -> str:
        return f"resume_dir {str(self.path)!r}"

    def load(self) -> dict | None:
        """The finished state, or None for a fresh directory; refuses another run's directory, and
        one whose files are not all there at the sizes recorded."""
        state_file = self.path / _STATE
        if not state_file.exists():
            return None
        try:
            state = json.loads(state_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self._where()}: {_STATE} is unreadable ({exc}); delete the directory to start "
                             "over") from None
        found = state.get("format") if isinstance(state, dict) else None
        if found != FORMAT:
            raise ValueError(f"{self._where()} was written in format {found!r}; this version reads format "
                             f"{FORMAT}. Delete it to start over.")
        bad = _validate(state)
        if bad is not None:
            raise ValueError(f"{self._where()}: {_STATE} is unreadable (bad {bad}); delete the directory to "
                             "start over")
        differ = _differences(state["fingerprint"], self.fingerprint)
        if differ:
            raise ValueError(f"{self._where()} holds a run with different {', '.join(differ)}; use another "
                             "resume_dir, or delete this one to start over")
        self.blocks, self.files = dict(state["blocks"]), dict(state["files"])
        for name, rec in self.files.items():  # a cut or missing file, before any work
            self._check_size(name, rec)
        return state

    def _damaged(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self._where()}: {name} is damaged ({why}); delete the directory to start over")

    def _check_size(self, name: str, rec: dict) -> None:
        path = self.path / name
        if Path(name).name != name or not path.is_file():
            raise self._damaged(name, "missing")
        size = path.stat().st_size
        if size != rec["size"]:
            raise self._damaged(name, f"{size} bytes, {rec['size']} were written")

    def _checked(self, name: str) -> str:
        """The path of a file state.json refers to, once its size and digest are the recorded ones."""
        rec = self.files.get(name)
        if rec is None:
            raise ValueError(f"{self._where()}: {_STATE} records no {name}; delete the directory to start over")
        self._check_size(name, rec)
        try:
            _, digest = file_digest(self.path / name)
        except OSError as exc:
            raise self._damaged(name, f"unreadable: {exc}") from None
        if digest != rec["digest"]:
            raise self._damaged(name, "hash differs from the one recorded when it was written")
        return str(self.path / name)

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        path = self._checked(name)
        try:
            return load_file(path)
        except Exception as exc:  # safetensors' SafetensorError, or what the OS says; one line
            raise self._damaged(name, "unreadable: " + " ".join(str(exc).split())[:200]) from None

    def check_block(self, name: str, digest: str) -> None:
        """Refuse to reuse the finished block `name` unless this model's weights for it are the ones
        it was made from."""
        recorded = self.blocks.get(name)
        if recorded != digest:
            raise ValueError(f"{self._where()} was written from other weights: {name} differs (sha256 "
                             f"{(recorded or 'none')[:12]}… recorded, {digest[:12]}… now); use another resume_dir "
                             "or delete this one")

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        return self._load(f"block_{index:05d}.safetensors")

    def stream(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The quantized and full-precision inputs of block `index`, per batch (this rank's)."""
        name = self._stream_file(index)
        tensors = self._load(name)
        try:
            q = [tensors[f"q.{b}"] for b in range(sum(k.startswith("q.") for k in tensors))]
            n_fp = sum(k.startswith("fp.") for k in tensors)
            return q, ([tensors[f"fp.{b}"] for b in range(n_fp)] if n_fp else None)
        except KeyError as exc:
            raise self._damaged(name, f"no tensor {exc}") from None

    def save_block(self, index: int, name: str, digest: str, packed: dict[str, torch.Tensor],
                   next_inputs: list[torch.Tensor] | None, next_fp_inputs: list[torch.Tensor] | None,
                   report: dict[str, Any], n_blocks: int) -> None:
        """Record block `index` (named `name`, its weights' `digest`) as finished: its packed tensors,
        the inputs of the next block, the report so far, each file's size and digest; then drop the
        stream the previous checkpoint needed."""
        last = index + 1 == n_blocks
        mine = None
        if next_inputs is not None and not last:  # each rank's share of the stream, by that rank
            stream = {f"q.{b}": x for b, x in enumerate(next_inputs)}
            stream.update({f"fp.{b}": x for b, x in enumerate(next_fp_inputs or [])})
            keep = self._stream_file(index + 1)
            mine = (keep, atomic_save_tensors(stream, self.path / keep))
        streams = dict(s for s in self.ranks.gather(mine) if s is not None)  # written, on every rank
        if self.ranks.is_writer:
            self._record(index, name, digest, packed, streams, report, n_blocks)
        self.ranks.barrier()  # every rank goes on once the block is recorded: a kill after this resumes after it

    def _record(self, index: int, name: str, digest: str, packed: dict[str, torch.Tensor], streams: dict[str, dict],
                report: dict[str, Any], n_blocks: int) -> None:
        """Rank 0's part of `save_block`: the block's file, then state.json naming every rank's stream."""
        block_file = f"block_{index:05d}.safetensors"
        self.files[block_file] = atomic_save_tensors(packed, self.path / block_file)
        for old in [f for f in self.files if f.startswith("stream_")]:
            del self.files[old]
        self.files.update(streams)
        self.blocks[name] = digest
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "blocks_done": index + 1, "n_blocks": n_blocks,
                 "blocks": self.blocks, "files": self.files, "report": report}
        atomic_write_bytes(self.path / _STATE, json.dumps(state, indent=1).encode())
        for old in self.path.glob("stream_*.safetensors"):
            if old.name not in streams:
                old.unlink()

    def _stream_file(self, index: int) -> str:
        if self.ranks.active:
            return f"stream_{index:05d}.rank{self.ranks.rank:03d}.safetensors"
        return f"stream_{index:05d}.safetensors"


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
        validate.check_layer(lname, layer, own, bool(cfg.sym))  # the same value rules as a checkpoint's
        place_layer(model, lname, layer, homes)
