"""Run under torchrun by tests/test_distributed.py: checks of `distributed.Ranks` on a real gloo group,
and a CLI run that SIGKILLs one rank after a block. Each check writes what its rank saw as JSON."""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist


def ranks_checks(out_dir: str) -> None:
    from hf_astroquant.distributed import Ranks, RanksDisagree, current
    from hf_astroquant.statistics import Stats

    dist.init_process_group("gloo")
    ranks = current()
    r = ranks.rank
    seen: dict = {"rank": r, "world_size": ranks.world_size}
    # a sum over ranks, in rank order, in place, the same bits everywhere; longer than one piece,
    # and not a multiple of the number of ranks
    shape = (3, (1 << 22) // 3 + 5)
    mine = torch.randn(*shape, generator=torch.Generator().manual_seed(r))
    theirs = [torch.randn(*shape, generator=torch.Generator().manual_seed(k)) for k in range(ranks.world_size)]
    expected = theirs[0].clone()
    for t in theirs[1:]:
        expected += t
    ranks.sum([mine])
    seen["sum_exact"] = bool(torch.equal(mine, expected))
    seen["sum_digest"] = float(mine.double().sum())
    seen["reduced_bytes"] = ranks.reduced_bytes
    # statistics: a rank without D adds zeros; token counts add up
    h = torch.full((4, 4), float(r + 1), dtype=torch.float64)
    stats = Stats(h, n=10 * (r + 1), d=torch.ones(4, 4, dtype=torch.float64) if r == 0 else None, n_fp=5 if r == 0 else 0)
    ranks.sum_stats(stats)
    seen["stats"] = {"h": float(stats.h[0, 0]), "n": stats.n, "d": float(stats.d[0, 0]), "n_fp": stats.n_fp}
    seen["numbers"] = ranks.sum_numbers([r + 1, 0.5])
    # an object, tensors and all, from rank 1
    got = ranks.broadcast({"from": r, "t": torch.arange(4) * (r + 1)} if r == 1 else None, src=1)
    seen["broadcast"] = {"from": got["from"], "t": got["t"].tolist()}
    seen["broadcast_bytes"] = ranks.broadcast_bytes
    ranks.check_same("same everywhere", "a string")
    try:
        ranks.check_same(f"rank {r}", "a string")
        seen["disagree"] = None
    except RanksDisagree as err:
        seen["disagree"] = str(err)
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def kill_after_block(argv: list[str]) -> int:
    """The CLI, with rank KILL_RANK killed (SIGKILL, no cleanup) once block KILL_AFTER_BLOCK is checkpointed."""
    from hf_astroquant import cli
    from hf_astroquant.pipeline import BlockListener, listening

    class KillRank(BlockListener):
        def after_block(self, i, name, result):
            if i == int(os.environ["KILL_AFTER_BLOCK"]) and os.environ.get("RANK") == os.environ["KILL_RANK"]:
                os.kill(os.getpid(), signal.SIGKILL)

    with listening(KillRank()):
        return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "ranks":
        ranks_checks(sys.argv[2])
    elif sys.argv[1] == "kill":
        sys.exit(kill_after_block(sys.argv[2:]))
    else:
        raise SystemExit(f"unknown check {sys.argv[1]!r}")
