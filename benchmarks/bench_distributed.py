"""Data-parallel calibration (torch.distributed, gloo) on SmolLM2-135M: 1 rank against 2, one thread each.

    python benchmarks/bench_distributed.py [--windows 32] [--methods gptq gptaq]   # table `distributed`

Each row is a fresh run (2 ranks: `torchrun --standalone --nproc-per-node 2`; 1 rank: plain python)
with OMP_NUM_THREADS=1, so the two ranks of a row use the two cores one rank of the other rows leaves
idle. W4 g128 on the protocol's Python-docs windows of 512 tokens. For every (method, statistics
dtype) it reports:

  * the median seconds per block (rank 0's clock, from a block's start to its checkpointed end;
    the first block is left out: it pays for warm-up);
  * the seconds of the statistics phase (H, and D for GPTAQ) and of the solves;
  * what crossed ranks per block: the statistics summed (`reduced_bytes`, each summed tensor's
    size, counted once) and the packed layers sent (`broadcast_bytes`). The ordered sum gathers
    every rank's piece, so each rank receives (N - 1) x reduced_bytes;
  * whether the 2-rank checkpoint equals the 1-rank one: the share of identical codes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(method: str, dtype: str, windows: int, out: str) -> None:
    import torch
    from protocol import calibration_windows, smollm2_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_astroquant
    from hf_astroquant import distributed
    from hf_astroquant.pipeline import BlockListener, listening

    torch.set_num_threads(1)
    path = smollm2_checkpoint()
    data = calibration_windows(AutoTokenizer.from_pretrained(path), n=windows)

    class Clock(BlockListener):
        def __init__(self):
            self.start, self.seconds = 0.0, []

        def before_block(self, i, name, stream, fp_stream):
            self.start = time.perf_counter()

        def after_block(self, i, name, result):
            self.seconds.append(time.perf_counter() - self.start)

    cfg = hf_astroquant.AstroQuantConfig(bits=4, group_size=128, method=method, dataset=data, statistics_dtype=dtype)
    with distributed.from_environment() as ranks, listening(Clock()) as clock:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
        seconds = time.perf_counter() - start
        if not ranks.is_writer:
            return
        report = model.hf_quantizer.report
        blocks = len(clock.seconds)
        moved = report.distributed or {"reduced_bytes": 0, "broadcast_bytes": 0}
        torch.save({k: v for k, v in model.state_dict().items() if k.endswith("qweight")}, out + ".pt")
        Path(out).write_text(json.dumps({
            "method": method, "statistics_dtype": dtype, "ranks": ranks.world_size, "windows": windows,
            "seconds": round(seconds, 1), "block_seconds": round(statistics.median(clock.seconds[1:]), 2),
            "statistics_seconds": round(report.phase_seconds.get("statistics", 0.0), 1),
            "solve_seconds": round(report.phase_seconds.get("solve", 0.0), 1),
            "reduced_mb_per_block": round(moved["reduced_bytes"] / blocks / 2**20, 2),
            "broadcast_mb_per_block": round(moved["broadcast_bytes"] / blocks / 2**20, 2),
        }))


def run(method: str, dtype: str, ranks: int, windows: int, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [__file__, "--child", method, dtype, str(windows), out]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(Path(out).read_text())


def same_codes(a: str, b: str) -> float:
    import torch

    from hf_astroquant.modules.packing import unpack_rows

    x, y = torch.load(a + ".pt"), torch.load(b + ".pt")
    same = total = 0
    for k in x:
        rows = x[k].shape[0] * 32 // 4  # W4: eight codes per int32 word
        cx, cy = unpack_rows(x[k], 4, rows), unpack_rows(y[k], 4, rows)
        same += int((cx == cy).sum())
        total += cx.numel()
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["gptq", "gptaq"])
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "DTYPE", "WINDOWS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
    import results_rows

    machine = results_rows.machine().rsplit(",", 1)[0] + ", 1 thread per rank"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for method in args.methods:
            for dtype in ("float32", "float64"):
                one = run(method, dtype, 1, args.windows, f"{d}/{method}-{dtype}-1.json")
                two = run(method, dtype, 2, args.windows, f"{d}/{method}-{dtype}-2.json")
                agree = same_codes(f"{d}/{method}-{dtype}-1.json", f"{d}/{method}-{dtype}-2.json")
                for r in (one, two):
                    r["codes_as_1_rank"] = round(agree if r["ranks"] == 2 else 1.0, 5)
                    r["speedup"] = round(one["block_seconds"] / r["block_seconds"], 2)
                    print(r, flush=True)
                    rows.append(results_rows.row("distributed", f"{method} {dtype} {r['ranks']} rank(s)", r,
                                                 command=results_rows.command([__file__, "--windows",
                                                                               str(args.windows), "--methods",
                                                                               *args.methods]),
                                                 machine=machine))
    results_rows.append_rows(rows)


if __name__ == "__main__":
    main()
