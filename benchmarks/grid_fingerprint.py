"""A fingerprint of every configuration of the benchmark grid (`bench_quality.ROWS`), on a tiny model.

    python benchmarks/grid_fingerprint.py --out before.json     # on one commit
    python benchmarks/grid_fingerprint.py --out after.json      # on another
    python benchmarks/grid_fingerprint.py --compare before.json after.json

`--calibration-batch-size 4` splits the 16 windows into 4 batches, so every Linear is calibrated
stage by stage over several forwards instead of in the single forward that one batch allows:
the two paths of the block's solve scheduling are checked apart. `--fp-capture-budget 0` makes the
full-precision inputs of the asymmetric solvers stage by stage (`stream.FP_CAPTURE_BUDGET`) instead
of captured in one forward: both must give the same hashes.

Each row quantizes the same tiny random Llama (3 layers, hidden 128) on the same random token
windows with the row's options, and records a SHA-256 of every tensor of the quantized model's
state dict (packed codes, scales, zeros, g_idx and the full-precision rest). Two commits that
give the same hashes for a row write bit-identical checkpoints for it. A refactor that must not
change results is checked with `--compare`; a row that one commit refuses is reported as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(rows: list[str], batch_size: int | None = None) -> dict[str, str]:
    import tempfile

    from bench_quality import ROWS
    from transformers import AutoModelForCausalLM

    import hf_astroquant

    torch.set_num_threads(1)  # one summation order, whatever the machine's core count
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (16, 8), generator=g).repeat_interleave(4, dim=1)
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        tiny_model().save_pretrained(d)
        for name in rows:
            opts = ROWS[name]
            try:
                cfg = hf_astroquant.AstroQuantConfig(dataset=windows, calibration_batch_size=batch_size, **opts)
                model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, quantization_config=cfg)
                out[name] = fingerprint(model)
            except (ValueError, TypeError) as err:
                out[name] = f"refused: {err}"
            print(f"{name}: {out[name][:16]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file for {row: sha256}")
    ap.add_argument("--rows", nargs="+", help="rows of bench_quality.ROWS (default: all)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--calibration-batch-size", type=int, help="windows per forward (default: all 16 in one)")
    ap.add_argument("--fp-capture-budget", type=int, help="bytes of full-precision inputs captured at once (default: "
                    "the package's)")
    args = ap.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        same = [r for r in before if after.get(r) == before[r]]
        dropped = sorted(set(before) - set(after))
        differ = sorted(set(before) - set(same) - set(dropped))
        print(f"{len(same)} of {len(before)} rows identical; {len(dropped)} no longer in the grid: {dropped}")
        for r in differ:
            print(f"  {r}: {before[r][:70]} -> {str(after.get(r, 'missing'))[:70]}")
        sys.exit(1 if differ else 0)
    from bench_quality import ROWS

    if args.fp_capture_budget is not None:
        import hf_astroquant.stream

        hf_astroquant.stream.FP_CAPTURE_BUDGET = args.fp_capture_budget
    result = run(args.rows or sorted(ROWS), args.calibration_batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
