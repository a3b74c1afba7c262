"""Memory of calibrating a mixture-of-experts model: one block and one expert's statistics at a time.

    python benchmarks/bench_moe_memory.py [--cap 100MB]   # the tables `moe_memory`, `moe_memory-components`

A synthetic Qwen3-MoE (random init, seed 0: 2 blocks, hidden 1024, 64 experts with
moe_intermediate 512, top-8; 413 MB of fp32 weights per block, 0.84 GB in all) is built once under
~/.cache/hf_astroquant and quantized twice, each run in a fresh process, as bench_offload.py does:

  * offloaded: ``from_pretrained(..., device_map="auto", max_memory={"cpu": CAP},
    offload_folder=...)``: the blocks stay on disk and the calibration loads one at a time;
  * in memory: the same call without a device map.

The experts become per-expert Linears (hf_astroquant/experts.py); calibration with one batch solves
each Linear in its pre-hook from the tokens routed to it, so one expert's statistics are held at a
time: gate/up's input Hessian H (hidden², shared by the two), down's (intermediate²), and the two
matrices of H's size that GPTQ's inversion needs beside it (L, then H⁻¹, then U), fp32. Each run
reports its peak RSS (``ru_maxrss``) above its RSS after the imports, split into transformers'
loading (everything before hf_astroquant's calibration starts) and the calibration (the kernel's
peak counter reset when it starts), and its wall time; the two checkpoints are compared tensor for
tensor (bit for bit). The rows state one block's weights, its activations (the hidden states in and
out for all windows), one expert's statistics, what all 64 experts' Hessians would take at once, and
the ratio of the offloaded calibration's peak to block + activations + one expert's statistics.
Calibration: 16 random windows of 256 tokens, one batch, W4 g128, GPTQ.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, num_hidden_layers=2,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
             vocab_size=2048)
N_SAMPLES, SEQLEN = 16, 256
CACHE = Path(os.environ.get("ASTROQUANT_CACHE", Path.home() / ".cache" / "hf_astroquant"))
MODEL = CACHE / "moe-qwen3-1024x64x2-fp32"


def config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**SHAPE, max_position_embeddings=SEQLEN, decoder_sparse_step=1, mlp_only_layers=[],
                          norm_topk_prob=True, tie_word_embeddings=False)


def build(path: Path) -> None:
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config()).save_pretrained(path, max_shard_size="300MB")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def watch_calibration(base: int) -> dict:
    """Wrap the quantizer's calibration (`quantize_model`, called by transformers after it has loaded
    the weights) to split the process's peak RSS into loading's and calibration's: at calibration's
    start the freed heap goes back to the OS (malloc_trim, as the pipeline does after every solve)
    and the kernel's peak counter is reset (/proc/self/clear_refs "5"). Returns the dict it fills."""
    import hf_astroquant.quantizer as quantizer
    from hf_astroquant.memory import trim_heap

    seen: dict = {}
    calibrate = quantizer.quantize_model

    def wrapped(*args, **kwargs):
        seen["load_peak_above_base"] = peak_bytes() - base
        trim_heap()
        seen["calibration_start_above_base"] = rss_bytes() - base
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        try:
            return calibrate(*args, **kwargs)
        finally:
            seen["calibration_seconds"] = round(time.perf_counter() - start, 1)
            seen["calibration_peak_above_base"] = peak_bytes() - base

    quantizer.quantize_model = wrapped
    return seen


def routing(record: dict) -> dict:
    """Tokens routed per expert (over every block) and the experts rounded to nearest for lack of them."""
    counts = [c for per_expert in record.get("expert_tokens", {}).values() for c in per_expert]
    return {"expert_tokens_min": min(counts, default=0), "expert_tokens_max": max(counts, default=0),
            "expert_fallbacks": len(record.get("expert_fallback", {}))}


def child(args) -> None:
    import torch

    import hf_astroquant
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (N_SAMPLES, SEQLEN), generator=gen)
    cfg = hf_astroquant.AstroQuantConfig(bits=4, group_size=128, method="gptq", dataset=ids,
                                         calibration_batch_size=N_SAMPLES)
    kwargs = {}
    if args.cap != "none":
        kwargs = dict(device_map="auto", max_memory={"cpu": args.cap}, offload_folder=args.offload_folder)
    base = rss_bytes()
    phases = watch_calibration(base)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32, **kwargs)
    seconds = time.perf_counter() - start
    peak = max(phases["load_peak_above_base"], phases["calibration_peak_above_base"])
    placement = sorted(set(map(str, getattr(model, "hf_device_map", {"": "cpu"}).values())))
    model.save_pretrained(args.save)
    print(json.dumps({"peak_rss_above_base": peak, **phases, "base_rss": base, "seconds": round(seconds, 1),
                      "placement": placement, **routing(model.astroquant_report)}))


def run_child(model: Path, save: Path, cap: str | None, offload_folder: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--save", str(save),
           "--offload-folder", offload_folder, "--cap", cap or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> dict:
    """Bit-identity of the two checkpoints, and the packed bytes of block 0 (from the first)."""
    import torch

    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    same = ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    packed = sum(t.numel() * t.element_size() for k, t in ta.items() if k.startswith("model.layers.0."))
    return {"checkpoints_bit_identical": same, "tensors_compared": len(ta), "packed_block_bytes": packed}


def budget() -> dict:
    """The components, in bytes: one block's weights (counted on the meta model), its activations,
    one expert's statistics (both Hessians, and gate/up's with GPTQ's two factors of its size), and
    every expert's Hessians at once."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config())
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    h, inter, experts = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    hessians = (h * h + inter * inter) * 4  # gate/up's input (shared) and down's, fp32
    one_expert = hessians + 2 * max(h, inter) ** 2 * 4  # + L/H⁻¹/U beside the larger H
    return {"block_bytes": size(model.model.layers[0]), "model_bytes": size(model),
            "activation_bytes": 2 * N_SAMPLES * SEQLEN * h * 4, "one_expert_hessians_bytes": hessians,
            "one_expert_stats_bytes": one_expert, "all_experts_hessians_bytes": experts * hessians}


def summarize(b: dict, offloaded: dict, full: dict, checks: dict, cap_bytes: int) -> dict:
    near = b["block_bytes"] + b["activation_bytes"] + b["one_expert_stats_bytes"]
    peak = offloaded["calibration_peak_above_base"]
    added = peak - offloaded["calibration_start_above_base"]
    return {
        "model": "synthetic Qwen3-MoE " + " ".join(f"{k}={v}" for k, v in SHAPE.items()),
        "calibration": f"{N_SAMPLES} x {SEQLEN} random ids, one batch, W4 g128 GPTQ",
        "cap_bytes": cap_bytes, **b, "model_over_cap": round(b["model_bytes"] / cap_bytes, 1),
        "offloaded": offloaded, "in_memory": full, **checks,
        "calibration_peak_over_block_activations_one_expert": round(peak / near, 3),
        "calibration_added_over_block_activations_one_expert": round(added / near, 3),
        "calibration_peak_over_block_activations_all_experts": round(
            peak / (b["block_bytes"] + b["activation_bytes"] + b["all_experts_hessians_bytes"]), 3),
        "max_rss_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def table_rows(r: dict, **kw) -> list[dict]:
    """The result in the schema of results_rows: the two runs in `moe_memory`, the components and the
    summary (a note row) in `moe_memory-components`."""
    import results_rows
    from bench_offload import cap_run

    mb = lambda x: f"{x / 1e6:,.0f} MB"  # noqa: E731
    off = r["offloaded"]
    runs = {"offloaded": cap_run(r["cap_bytes"]), "in_memory": "no device map (all in memory)"}
    parts = [("model", "model (fp32)", r["model_bytes"], f"({r['model_over_cap']}× the cap)"),
             ("block", "one block's weights (64 experts, attention, router)", r["block_bytes"], ""),
             ("activations", "its activations (hidden states in and out, all windows)", r["activation_bytes"], ""),
             ("one-expert", "one expert's statistics (H of gate/up and of down, + GPTQ's two factors)",
              r["one_expert_stats_bytes"], f"({mb(r['one_expert_hessians_bytes'])} of Hessians)"),
             ("all-experts", "all 64 experts' Hessians at once (never held)", r["all_experts_hessians_bytes"], ""),
             ("packed-block", "one block packed (W4 g128, from the checkpoint)", r["packed_block_bytes"], "")]
    note = (f"Offloaded calibration peak / (block + activations + one expert's statistics) = "
            f"**{r['calibration_peak_over_block_activations_one_expert']}** (what calibration added to the RSS it "
            f"started from: {r['calibration_added_over_block_activations_one_expert']}); against block + "
            f"activations + all experts' Hessians it would be {r['calibration_peak_over_block_activations_all_experts']}. "
            f"Tokens routed per expert {off['expert_tokens_min']}–{off['expert_tokens_max']} (experts rounded to "
            f"nearest for lack of tokens: {off['expert_fallbacks']}). Checkpoints bit-identical: "
            f"**{r['checkpoints_bit_identical']}** ({r['tensors_compared']} tensors). {r['calibration']}.")
    summary = {k: v for k, v in r.items() if k not in runs}
    return ([results_rows.row("moe_memory", k, {"run": name, **r[k]}, **kw) for k, name in runs.items()]
            + [results_rows.row("moe_memory-components", k, {"component": name, "bytes": n, "also": also}, **kw)
               for k, name, n, also in parts]
            + [results_rows.row("moe_memory-components", "summary", {**summary, "note": note}, **kw)])


def measure(cap: str) -> dict:
    if not (MODEL / "config.json").exists():
        print(f"building {MODEL} ...", flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); "
                        f"import bench_moe_memory as b; from pathlib import Path; b.build(Path({str(MODEL)!r}))"],
                       check=True)
    from accelerate.utils import convert_file_size_to_int

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        offloaded = run_child(MODEL, tmp / "offloaded", cap, str(tmp / "offload"))
        print("offloaded:", offloaded, flush=True)
        full = run_child(MODEL, tmp / "full", None, str(tmp / "unused"))
        print("in memory:", full, flush=True)
        checks = compare(tmp / "offloaded", tmp / "full")
    return summarize(budget(), offloaded, full, checks, convert_file_size_to_int(cap))


def main() -> None:
    import results_rows
    from bench_offload import parser

    args = parser(__doc__).parse_args()
    if args.child:
        child(args)
        return
    result = measure(args.cap)
    results_rows.append_rows(table_rows(result, command=results_rows.command([__file__, "--cap", args.cap])))


if __name__ == "__main__":
    main()
