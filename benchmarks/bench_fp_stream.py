"""The full-precision stream of GPTAQ/ResComp, stage by stage against every input at once, on SmolLM2-135M.

    python benchmarks/bench_fp_stream.py [--windows 64]   # the table `fp_stream` of benchmarks/results/rows.jsonl

The asymmetric solvers need, for every Linear, the input the full-precision block gives it (X̃).
Two ways to have it, both giving the same checkpoint bit for bit (checked here):

  * captured (the pipeline's choice while a block's inputs fit `stream.FP_CAPTURE_BUDGET`, 4 GiB,
    and always for blocks with experts): one full-precision forward captures every Linear's input
    of every window, held until the block is done;
  * stagewise (its choice past the budget; forced here with a budget of 0): the full-precision
    block runs once for its outputs, and again on each batch up to each stage's first Linear when
    that stage's statistics are taken; the stream holds the block's inputs and outputs and one
    stage's input of one batch.

Each run is a fresh process: GPTAQ W4 g64 on the protocol's Python-docs windows (512 tokens).
It reports the report's peak stream bytes (`fp_stream_bytes`), the seconds of the full-precision
forwards (`phase_seconds["fp_stream"]`), the whole run's seconds and the peak RSS above the RSS
after loading the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(mode: str, windows: int, out: str) -> None:
    import torch
    from protocol import calibration_windows, smollm2_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_astroquant
    import hf_astroquant.stream as stream

    path = smollm2_checkpoint()
    data = calibration_windows(AutoTokenizer.from_pretrained(path), n=windows)
    if mode == "stagewise":
        stream.FP_CAPTURE_BUDGET = 0
    cfg = hf_astroquant.AstroQuantConfig(bits=4, group_size=64, method="gptaq", dataset=data)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # warm the page cache
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    seconds = time.perf_counter() - start
    report = model.hf_quantizer.report
    torch.save({k: v for k, v in model.state_dict().items()}, out + ".pt")
    Path(out).write_text(json.dumps({
        "mode": mode, "windows": windows, "fp_stream_bytes": report.fp_stream_bytes,
        "fp_stream_seconds": round(report.phase_seconds.get("fp_stream", 0.0), 1), "seconds": round(seconds, 1),
        "peak_rss_above_model_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024),
    }))


LABELS = {"captured": "captured in one forward (the default under the budget)", "stagewise": "stage by stage"}


def table_rows(result: dict, **kw) -> list[dict]:
    """The result in the schema of results_rows: one row per mode, then the bit-identity (a note row)."""
    import results_rows

    note = f"Bit-identical: {'yes' if result['bit_identical'] else 'NO'} ({result['tensors']} tensors)."
    return [results_rows.row("fp_stream", r["mode"], {**r, "inputs": LABELS[r["mode"]]}, **kw) for r in result["rows"]] + [
        results_rows.row("fp_stream", "bit-identity", {k: v for k, v in result.items() if k != "rows"} | {"note": note},
                         **kw)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "WINDOWS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2])
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in ("captured", "stagewise"):
            out = f"{d}/{mode}.json"
            subprocess.run([sys.executable, __file__, "--child", mode, str(args.windows), out], check=True)
            rows.append(json.loads(Path(out).read_text()))
            print(rows[-1], flush=True)
        a, b = (torch.load(f"{d}/{m}.json.pt") for m in ("captured", "stagewise"))
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = {"rows": rows, "bit_identical": identical, "tensors": len(a),
              "protocol": "SmolLM2-135M fp32, GPTAQ W4 g64, Python-docs windows of 512 tokens, one process per row"}
    import results_rows

    results_rows.append_rows(table_rows(result, command=results_rows.command([__file__, "--windows", str(args.windows)])))


if __name__ == "__main__":
    main()
