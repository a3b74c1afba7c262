"""Calibration of a model several times larger than its memory cap (accelerate disk offload).

    python benchmarks/bench_offload.py [--cap 100MB]   # the table `offload` of benchmarks/results/rows.jsonl

A synthetic Llama (8 blocks, hidden 2048, MLP 5632: 206 MB of fp32 weights per block, 1.7 GB in
all) is built once under ~/.cache/hf_astroquant and quantized twice, each run in a fresh process:

  * offloaded: ``from_pretrained(..., device_map="auto", max_memory={"cpu": CAP},
    offload_folder=...)``, so accelerate keeps on the CPU only what fits under CAP and the blocks
    stay on disk; the calibration loads one block at a time;
  * unconstrained: the same call without a device map (the whole model in memory).

Each run reports its peak RSS (``ru_maxrss``) above the RSS it had after the imports, its
wall time, and saves the quantized model. The benchmark then checks the two checkpoints tensor
by tensor (bit for bit), and compares the offloaded run's peak with one block plus its
activations, where "activations" counts what calibrating one block must hold at once: the
block's input and output hidden states for all windows, the widest Linear input (the MLP
activation before down_proj), and that Linear's Hessian H with the two matrices of its size
that inverting it needs beside it (GPTQ's Cholesky factor L, then H⁻¹, then U; torch has no
in-place triangular inverse), 3·in² fp32. The summary row also gives the ratio without those two
factors. Calibration: 16 random windows of 256 tokens, one batch, W4 g128, GPTQ.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=2048)
N_SAMPLES, SEQLEN = 16, 256
CACHE = Path(os.environ.get("ASTROQUANT_CACHE", Path.home() / ".cache" / "hf_astroquant"))


def build(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, max_position_embeddings=SEQLEN, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="300MB")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import torch

    import hf_astroquant
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (N_SAMPLES, SEQLEN), generator=gen)
    cfg = hf_astroquant.AstroQuantConfig(bits=4, group_size=128, dataset=ids, calibration_batch_size=N_SAMPLES)
    kwargs = {}
    if args.cap != "none":
        kwargs = dict(device_map="auto", max_memory={"cpu": args.cap}, offload_folder=args.offload_folder)
    base = rss_bytes()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    placement = sorted(set(map(str, getattr(model, "hf_device_map", {"": "cpu"}).values())))
    model.save_pretrained(args.save)
    print(json.dumps({"peak_rss_above_base": peak - base, "base_rss": base, "seconds": round(seconds, 1),
                      "placement": placement}))


def run_child(model: Path, save: Path, cap: str | None, offload_folder: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--save", str(save),
           "--offload-folder", offload_folder, "--cap", cap or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_checkpoints(a: Path, b: Path) -> tuple[bool, int]:
    import torch
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = tensors(a), tensors(b)
    same = ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    return same, len(ta)


def budget() -> dict:
    h, inter, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    block = (4 * h * h + 3 * h * inter + 2 * h) * 4
    tokens = N_SAMPLES * SEQLEN
    hessian = inter * inter * 4
    activations = 2 * tokens * h * 4 + tokens * inter * 4 + 3 * hessian
    embed = 2 * SHAPE["vocab_size"] * h * 4 + h * 4
    return {"block_bytes": block, "activation_bytes": activations, "hessian_bytes": hessian,
            "model_bytes": L * block + embed}


def cap_run(cap_bytes: int) -> str:
    """The tables' name of the offloaded run."""
    return f"`device_map=\"auto\", max_memory={{\"cpu\": \"{cap_bytes // 10**6}MB\"}}` + offload_folder"


def table_rows(r: dict, **kw) -> list[dict]:
    """The result in the schema of results_rows: the two runs, then the summary (a note row)."""
    import results_rows

    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    runs = {"offloaded": cap_run(r["cap_bytes"]), "unconstrained": "no device map (all in memory)"}
    note = (f"Model {mb(r['model_bytes'])} ({r['model_over_cap']}× the cap); one block {mb(r['block_bytes'])}; its "
            f"activations {mb(r['activation_bytes'])} (hidden states in/out, the MLP activation, and down_proj's "
            f"Hessian with the two factors of its size that inverting it needs). Offloaded peak / (block + "
            f"activations) = **{r['peak_over_block_plus_activations']}** (counting one Hessian only: "
            f"{r['peak_over_block_plus_activations_one_hessian']}). Checkpoints bit-identical: "
            f"**{r['checkpoints_bit_identical']}** ({r['tensors_compared']} tensors). {r['calibration']}.")
    summary = {k: v for k, v in r.items() if k not in runs}
    return [results_rows.row("offload", k, {"run": name, **r[k]}, **kw) for k, name in runs.items()] + [
        results_rows.row("offload", "summary", {**summary, "note": note}, **kw)]


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a two-run memory benchmark: --cap and the child run's hidden flags."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", default="100MB", help="max_memory for the CPU in the offloaded run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--offload-folder", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.child:
        child(args)
        return

    model = CACHE / "offload-llama-2048x8-fp32"
    if not (model / "config.json").exists():
        print(f"building {model} ...", flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import bench_offload as b; from pathlib import Path; b.build(Path({str(model)!r}))"],
                       check=True)
    from accelerate.utils import convert_file_size_to_int

    cap_bytes = convert_file_size_to_int(args.cap)
    b = budget()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        offloaded = run_child(model, tmp / "offloaded", args.cap, str(tmp / "offload"))
        print("offloaded:", offloaded, flush=True)
        full = run_child(model, tmp / "full", None, str(tmp / "unused"))
        print("unconstrained:", full, flush=True)
        same, n = same_checkpoints(tmp / "offloaded", tmp / "full")
    bound = 1.5 * (b["block_bytes"] + b["activation_bytes"])
    result = {
        "model": "synthetic Llama " + " ".join(f"{k}={v}" for k, v in SHAPE.items()),
        "calibration": f"{N_SAMPLES} x {SEQLEN} random ids, one batch, W4 g128 GPTQ",
        "cap_bytes": cap_bytes, **b, "model_over_cap": round(b["model_bytes"] / cap_bytes, 1),
        "offloaded": offloaded, "unconstrained": full,
        "peak_over_block_plus_activations": round(offloaded["peak_rss_above_base"]
                                                  / (b["block_bytes"] + b["activation_bytes"]), 3),
        "peak_over_block_plus_activations_one_hessian": round(
            offloaded["peak_rss_above_base"] / (b["block_bytes"] + b["activation_bytes"] - 2 * b["hessian_bytes"]), 3),
        "within_1_5x": offloaded["peak_rss_above_base"] < bound,
        "checkpoints_bit_identical": same, "tensors_compared": n,
        "max_rss_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    import results_rows

    results_rows.append_rows(table_rows(result, command=results_rows.command([__file__, "--cap", args.cap])))


if __name__ == "__main__":
    main()
