"""Content digests of weights and files, for resume identity (`resume.py`).

A digest is sha256 over the sha256 digests of the data's 16 MiB pieces (with, for a tensor, a
header of its name, shape and dtype), so the pieces hash in parallel on every core and no tensor
is copied (but off an accelerator). It is therefore not what `sha256sum` prints. `hash_speed`
measures it. Offloaded weights (on the meta device) are read through accelerate's hooks, one
tensor at a time, and cast as onloading casts them, so they hash as they do in memory.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import torch
from torch import nn

from . import offload
from .experts import ExpertList, expert_weights

_PIECE = 16 << 20  # bytes hashed as one piece of a digest

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _map(fn, items: list) -> list:
    """`fn` over `items` in order, on a thread pool when there is more than one (hashlib and pread
    release the GIL)."""
    global _pool
    if len(items) <= 1:
        return [fn(x) for x in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="astroquant-hash")
    return list(_pool.map(fn, items))


def _sha(data) -> bytes:
    return hashlib.sha256(data).digest()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of `t`, without a copy when it is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """The digest of one tensor: its name, shape, dtype and bytes."""
    data = _raw(t)
    pieces = _map(_sha, [data[o:o + _PIECE] for o in range(0, len(data), _PIECE)] or [data])
    head = f"{name}\0{tuple(t.shape)}\0{str(t.dtype).removeprefix('torch.')}\0".encode()
    return hashlib.sha256(head + b"".join(pieces)).hexdigest()


def weights_digests(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """{name: tensor_digest} (one tensor in memory at a time: each may be read from disk)."""
    return {name: tensor_digest(name, t) for name, t in named}


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for a set of named digests, in any order."""
    return hashlib.sha256("".join(f"{n}={d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()


def file_digest(path: Path) -> tuple[int, str]:
    """(size, digest) of a file: its pieces are read and hashed in parallel."""
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        if hasattr(os, "pread"):
            pieces = _map(lambda o: _sha(os.pread(fd, _PIECE, o)), list(range(0, size, _PIECE)))
        else:
            pieces = [_sha(f.read(_PIECE)) for _ in range(0, size, _PIECE)]
    return size, hashlib.sha256(b"".join(pieces or [_sha(b"")])).hexdigest()


def hash_speed(megabytes: int = 512) -> dict[str, float]:
    """MB/s of `tensor_digest` on an in-memory tensor, and of one thread's plain sha256."""
    t = torch.empty(megabytes << 20, dtype=torch.uint8).random_(generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    tensor_digest("t", t)
    pieces = megabytes / (time.perf_counter() - start)
    start = time.perf_counter()
    hashlib.sha256(_raw(t)).digest()
    return {"tensor_digest_MBps": round(pieces * 1.048576), "sha256_one_thread_MBps":
            round(megabytes * 1.048576 / (time.perf_counter() - start)), "threads": min(16, os.cpu_count() or 1)}


def _stored(module: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """`module`'s tensor `name` as it holds it: on meta, read from its offload hook (cast as
    `offload.onload` casts it, so the value is the one the block loop sees)."""
    if t.device.type != "meta":
        return t
    hook = offload.offload_hook(module)
    try:
        value = hook.weights_map[name]
    except (AttributeError, KeyError, TypeError):
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds it: "
                         "cannot hash the weights for resume_dir") from None
    if value.dtype != t.dtype and value.is_floating_point():
        value = value.to(t.dtype)
    return value


def _offloaded_experts(prefix: str, experts: ExpertList) -> Iterator[tuple[str, torch.Tensor]]:
    """An `ExpertList` whose fused weights are still offloaded: each expert Linear's weight (and
    bias), as views of the fused tensors read once, named as `onload_experts` names them."""
    module, layout = experts.source
    fused = SimpleNamespace(**{n: _stored(module, n, t) for n, t in module.named_parameters(recurse=False)})
    for e, (expert, linears) in enumerate(zip(experts, expert_weights(fused, layout))):
        for lname, (weight, bias) in zip(expert.names, linears):
            yield f"{prefix}{e}.{lname}.weight", weight
            if bias is not None:
                yield f"{prefix}{e}.{lname}.bias", bias


def stored_weights(root: nn.Module, skip: Iterable[nn.Module] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) of every parameter and persistent buffer under `root`, less the modules in
    `skip` and theirs; a tensor on meta is read through its offload hook (one at a time)."""
    skip_ids, seen, skipped = {id(m) for m in skip}, set(), []
    for mname, module in root.named_modules():
        if any(mname.startswith(s) for s in skipped):
            continue
        prefix = f"{mname}." if mname else ""
        if id(module) in skip_ids:
            skipped.append(prefix)
            continue
        if isinstance(module, ExpertList) and module.source is not None:
            skipped.append(prefix)
            yield from _offloaded_experts(prefix, module)
            continue
        own = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for n, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield prefix + n, _stored(module, n, t)


def block_digest(block: nn.Module) -> str:
    """The digest of a decoder block's weights (names relative to the block)."""
    return combined_digest(weights_digests(stored_weights(block)))
