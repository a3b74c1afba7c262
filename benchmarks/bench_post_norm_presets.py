"""The presets on post-norm families, where the residual rotation cannot fold (transform="auto" runs
the scales there): block-output error of each preset, and of balanced/best with no transform in the
rotation's place, on the family matrix's tiny random models (tests/families.py), over model seeds.

    python benchmarks/bench_post_norm_presets.py [--families gemma3_text gemma2 olmo2 glm4] [--seeds 0 1 2]

The block-output error is the mean over blocks of ‖h_q − h‖/‖h‖ on 8 windows the run was not
calibrated on (h: the block's output hidden state). Tiny random models have no outlier channels, so
this checks that the fallback runs and costs nothing there; what scales gain on real weights is in
docs/results.md (preconditioning table).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def block_error(q, fp, ids) -> float:
    with torch.no_grad():
        got = q(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        want = fp(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    return sum(float((a - b).norm() / b.norm()) for a, b in zip(got, want)) / len(want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["gemma3_text", "gemma2", "olmo2", "glm4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    from families import auto_class, tiny_model
    from tiny import calib_ids

    from hf_astroquant import AstroQuantConfig

    logging.disable(logging.WARNING)
    runs = [("fast", {}), ("balanced", {}), ("balanced", {"transform": "none"}), ("best", {}),
            ("best", {"transform": "none"})]
    errors: dict[str, list[float]] = {}
    for family in args.families:
        for seed in args.seeds:
            data, held = calib_ids(16, 32, seed=seed), calib_ids(8, 32, seed=100 + seed)
            with tempfile.TemporaryDirectory() as d:
                tiny_model(family, seed=seed).save_pretrained(d)
                fp = auto_class(family).from_pretrained(d).eval()
                for bits in (4, 3, 2):
                    for quality, extra in runs:
                        cfg = AstroQuantConfig.recommended(bits, quality, dataset=data, **extra)
                        q = auto_class(family).from_pretrained(d, quantization_config=cfg).eval()
                        key = f"W{bits} {quality}" + (" (no transform)" if extra else "")
                        errors.setdefault(key, []).append(block_error(q, fp, held))
    print(f"| run | mean block-output error ({len(args.families)} families × {len(args.seeds)} seeds) |")
    print("|---|---|")
    for key in sorted(errors, key=lambda k: (-int(k[1]), k)):
        print(f"| {key} | {statistics.mean(errors[key]):.4f} |")


if __name__ == "__main__":
    main()
