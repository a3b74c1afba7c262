"""What the online input rotation (online_rotation) costs at inference: one packed layer's forward
with and without its rotation, on this CPU.

    python benchmarks/bench_rotation_overhead.py

SmolLM2-135M's shapes: down_proj 1536 -> 576 (rotated by "down" and "writers") and o_proj 576 -> 576
("writers"), W4 g64, random weights; one token (decode) and 512 tokens (prefill), fp32 and bf16;
microseconds per forward, the median of 5 repeats.
"""

from __future__ import annotations

import statistics
import time

import torch

from hf_astroquant import AstroQuantConfig
from hf_astroquant.algorithms import solve_linear
from hf_astroquant.algorithms.solve import SolverOptions
from hf_astroquant.modules import InputRotation, make_layer


def packed_layer(n_in: int, n_out: int, rotated: bool):
    W = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(0))
    result, _ = solve_linear(W, None, SolverOptions(bits=4, group_size=64, sym=False, mse=False, method="rtn"))
    return make_layer(result, AstroQuantConfig(bits=4, group_size=64), None,
                      InputRotation.random(n_in, 0) if rotated else None)


@torch.no_grad()
def microseconds(layer, x: torch.Tensor, reps: int) -> float:
    for _ in range(5):
        layer(x)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            layer(x)
        runs.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(runs)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for n_in, n_out, name in ((1536, 576, "down_proj"), (576, 576, "o_proj")):
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 512):
                x = torch.randn(rows, n_in, dtype=dtype)
                plain, rotated = packed_layer(n_in, n_out, False), packed_layer(n_in, n_out, True)
                plain.prepare(dtype)
                rotated.prepare(dtype)
                reps = 200 if rows == 1 else 20
                a, b = microseconds(plain, x, reps), microseconds(rotated, x, reps)
                print(f"| {name} {n_in}->{n_out} | {str(dtype).removeprefix('torch.')} | {rows} | {a:.0f} | {b:.0f} | "
                      f"{b / a:.2f}x | {plain.active_backend} |")


if __name__ == "__main__":
    main()
