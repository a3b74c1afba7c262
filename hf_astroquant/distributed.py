"""Data-parallel calibration over torch.distributed: one rank per device, each with its share of the
calibration windows.

What crosses ranks, and when (block_solve.py, refinement.py, preconditioner.py call these):
  - the statistics of every Linear's input (H, and D, G for the asymmetric solvers), the per-site H of
    the scale search and the experts' token counts are summed: `Ranks.sum`, `Ranks.sum_stats`;
  - the Linears of a stage are solved by different ranks (member k by rank k mod N) and each packed
    result is sent to the others: `Ranks.broadcast`;
  - refinement sums its gradients and its losses over ranks at every step.

The sums are made in rank order: each rank sums one slice of the tensor, adding every rank's piece of
that slice 0, 1, …, N−1, and the summed slices are then gathered (a reduce-scatter and an all-gather,
as a ring all-reduce moves: 2·(N−1)/N of the tensor per rank). So every rank holds the same bits and a
rerun with the same N gives the same result; a different N changes only the order of floating-point
additions (which float64 statistics make invisible: `statistics_dtype`). After each block every rank
checks that it holds the same packed layers as rank 0 (`Ranks.check_same`): ranks that drifted apart
stop the run rather than write a wrong checkpoint.

Without an initialized process group (or with one rank) `Ranks` is the identity and nothing here
runs a collective. The CLI sets the group up from torchrun's environment (`from_environment`);
Python users initialize it themselves before `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from contextlib import contextmanager
from typing import Any, Iterator

import torch

# Sums move in pieces of this many elements, so the N gathered copies stay small beside H itself.
_CHUNK = 1 << 22


class RanksDisagree(RuntimeError):
    """Ranks that must hold the same value do not: the run stops before anything wrong is written."""


class Ranks:
    """This process's place in the job (rank, world_size) and the collectives the calibration uses.
    Counts what it moves: `reduced_bytes` (the statistics summed, once each) and `broadcast_bytes`
    (the packed layers sent), for the report and the benchmark."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size} is not a place in a job")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.reduced_bytes = 0
        self.broadcast_bytes = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the checkpoint, the report, the card and the resume state."""
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """The indices of this rank's calibration windows among `n`: every world_size-th one, from its
        rank (so the first windows, which fp_samples keeps, are spread over every rank)."""
        if n < self.world_size:
            raise ValueError(f"{n} calibration window(s) cannot be shared by {self.world_size} ranks: each rank "
                             f"needs at least one; raise n_samples to at least {self.world_size}")
        return list(range(self.rank, n, self.world_size))

    def local_count(self, n_first: int) -> int:
        """How many of the first `n_first` windows (of all ranks) are this rank's."""
        return len(range(self.rank, n_first, self.world_size))

    # -- collectives ---------------------------------------------------------------------------

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over ranks, in place; every rank gets the same bits."""
        if not self.active:
            return
        import torch.distributed as dist

        n = self.world_size
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("Ranks.sum needs contiguous tensors")
            flat = t.view(-1)
            self.reduced_bytes += flat.numel() * flat.element_size()
            for start in range(0, flat.numel(), _CHUNK):
                piece = flat[start:start + _CHUNK]
                width = -(-piece.numel() // n)  # each rank sums one slice of this width
                padded = torch.zeros(n * width, dtype=piece.dtype, device=piece.device)
                padded[:piece.numel()] = piece
                theirs = torch.empty_like(padded)  # row r: rank r's piece of this rank's slice
                dist.all_to_all_single(theirs, padded, group=self.group)
                rows = theirs.view(n, width)
                mine = rows[0].clone()
                for r in range(1, n):  # rank order
                    mine.add_(rows[r])
                slices = [torch.empty_like(mine) for _ in range(n)]
                dist.all_gather(slices, mine, group=self.group)
                piece.copy_(torch.cat(slices)[:piece.numel()])

    def sum_numbers(self, values: list[float | int]) -> list:
        """Each number summed over ranks (in rank order), as float64 (ints come back as ints)."""
        if not self.active:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        self.sum([t])
        return [int(round(s)) if isinstance(v, int) else s for v, s in zip(values, t.tolist())]

    def sum_stats(self, stats):
        """A stage's `Stats` (statistics.py) summed over ranks: H, D and G and their token counts.
        A rank whose windows gave no D (or G) adds zeros."""
        if not self.active:
            return stats
        if stats.normalized:
            raise ValueError("sum_stats needs the sums, before Stats.normalize")
        shapes = self.gather((stats.d is not None, stats.g is not None))
        has_d, has_g = any(s[0] for s in shapes), any(s[1] for s in shapes)
        if has_d and stats.d is None:
            stats.d = torch.zeros_like(stats.h)
        if has_g and stats.g is None:
            stats.g = torch.zeros_like(stats.h)
        self.sum([t for t in (stats.h, stats.d, stats.g) if t is not None])
        stats.n, stats.n_fp = self.sum_numbers([stats.n, stats.n_fp])
        return stats

    def gather(self, value: Any) -> list[Any]:
        """Every rank's (picklable, small) `value`, in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def broadcast(self, value: Any, src: int) -> Any:
        """`value` as rank `src` holds it (tensors included, on this rank's device), on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        device = self._device()
        size = torch.zeros(1, dtype=torch.int64, device=device)
        data = None
        if self.rank == src:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
            size[0] = data.numel()
        dist.broadcast(size, src, group=self.group)
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.broadcast(data, src, group=self.group)
        self.broadcast_bytes += int(size.item())
        if self.rank == src:
            return value
        # the bytes come from another rank of this same job (our own process), not from a file
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=device, weights_only=False)

    def check_same(self, value: Any, what: str) -> None:
        """Stop with `RanksDisagree` unless every rank holds the same (picklable) `value`."""
        if not self.active:
            return
        digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
        seen = self.gather(digest)
        differ = [r for r, d in enumerate(seen) if d != seen[0]]
        if differ:
            raise RanksDisagree(f"ranks {differ} hold another {what} than rank 0; the run stops before it writes "
                                "anything from it")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def record(self) -> dict[str, int]:
        """What the report keeps of the job: its size and what crossed ranks."""
        return {"world_size": self.world_size, "reduced_bytes": self.reduced_bytes,
                "broadcast_bytes": self.broadcast_bytes}


def current() -> Ranks:
    """The job this process is part of: the default process group when one is initialized, else one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_world_size() -> int:
    """The world size torchrun (or another launcher) set in the environment; 1 when none did."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


@contextmanager
def from_environment() -> Iterator[Ranks]:
    """Under torchrun (WORLD_SIZE > 1 in the environment) initialize the default process group for the
    duration (NCCL when CUDA is there, one device per rank by LOCAL_RANK; gloo on CPU), and tear it
    down after; otherwise, or when the caller has a group already, leave things as they are."""
    import torch.distributed as dist

    if launched_world_size() == 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()
