"""The main job: quantize the real SmolLM2-135M to 4 bits, print perplexity before and after, save.

    python benchmarks/quickstart.py --bits 4 --out smollm2-w4               # every option at its default
    python benchmarks/quickstart.py --bits 3 --preset best --out smollm2-w3  # a measured preset

The benchmark protocol (`protocol.py`): calibration on 64 windows of 512 tokens drawn with seed 0
from the Python docs, perplexity on the first 8 windows of 2048 tokens of WikiText-2 test. Both
texts ship with this repository (`benchmarks/data/`, `hf_astroquant/data/`), so a fresh clone
prints the README's numbers without network or ../shared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=None, help="default: 64, or the preset's")
    ap.add_argument("--preset", choices=("fast", "balanced", "best"), default=None,
                    help="a measured preset (default: every option at its default, which is the fast preset)")
    ap.add_argument("--out", default="smollm2-astroquant")
    args = ap.parse_args()

    import hf_astroquant
    from hf_astroquant.eval import perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    calib, eval_ids = protocol.calibration_windows(tok, "out"), protocol.wikitext_test_ids(tok)
    seqlen, n_windows, what = 2048, 8, "WikiText-2 test, 8 x 2048 tokens"

    fp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ppl_fp = perplexity(fp, eval_ids, seqlen, n_windows)
    del fp
    data = dict(dataset=calib, tokenizer=tok, n_samples=64, seqlen=512)
    if args.group_size is not None:
        data["group_size"] = args.group_size
    if args.preset:
        cfg = hf_astroquant.AstroQuantConfig.recommended(bits=args.bits, quality=args.preset, **data)
    else:
        cfg = hf_astroquant.AstroQuantConfig(bits=args.bits, **{"group_size": 64, **data})
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=cfg)
    seconds = time.perf_counter() - start
    ppl_q = perplexity(model, eval_ids, seqlen, n_windows)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"\nSmolLM2-135M, {what}")
    print(f"  full precision perplexity: {ppl_fp:.2f}")
    label = f"{cfg.method} W{cfg.bits} g{cfg.group_size}" + (f" ({args.preset} preset)" if args.preset else "")
    print(f"  {label} perplexity: {ppl_q:.2f}  (quantized in {seconds:.0f} s)")
    print(f"  saved to {args.out}/ ({size / 2**20:.0f} MiB of safetensors; the tied fp32 embedding is most of it)")
    print(f"  reload with: import hf_astroquant; AutoModelForCausalLM.from_pretrained({args.out!r})")


if __name__ == "__main__":
    main()
