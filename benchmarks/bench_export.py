"""GPTQ export checked in GPTQModel: SmolLM2-135M quantized, exported, loaded by GPTQModel's CPU
kernel, logits compared with ours.

    GPTQMODEL_PYTHON=/path/to/venv/bin/python python benchmarks/bench_export.py

GPTQModel (`pip install torch==2.13.0 gptqmodel==7.6.0`, best in its own venv) runs in the Python
named by GPTQMODEL_PYTHON (default: this one). Each configuration writes its row to the table `export`
of benchmarks/results/rows.jsonl (results_rows.py). The error is ‖Δ‖/‖logits‖ over 2 × 256 tokens of WikiText-2 test;
`truth` is our checkpoint evaluated in fp32 (the same codes, no fp16 rounding).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

LOAD = r"""
import os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
with torch.inference_mode():
    torch.save(model.model(input_ids=torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""
CONFIGS = {  # name: (AstroQuantConfig options, export format)
    "w4g64-sym-v1": (dict(bits=4, group_size=64, sym=True), "gptq"),
    "w4g64-asym-actorder-v2": (dict(bits=4, group_size=64, sym=False, desc_act=True, static_groups=True), "gptq_v2"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    python = os.environ.get("GPTQMODEL_PYTHON", sys.executable)

    import hf_astroquant
    from hf_astroquant.export.gptq import export_gptq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    calib = protocol.calibration_windows(tok, "out", n=32, seqlen=512)
    ids = protocol.wikitext_test_ids(tok)[: 2 * 256].view(2, 256)
    for name in args.configs:
        options, fmt = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cfg = hf_astroquant.AstroQuantConfig(dataset=calib, **options)
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16, quantization_config=cfg)
            model.save_pretrained(tmp / "q")
            tok.save_pretrained(tmp / "q")
            export_gptq(tmp / "q", tmp / "g", checkpoint_format=fmt)
            torch.save(ids, tmp / "ids.pt")
            proc = subprocess.run([python, "-c", LOAD, str(tmp / "g"), str(tmp / "ids.pt"), str(tmp / "o.pt")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"GPTQModel failed ({python}):\n{proc.stderr[-3000:]}")
            theirs = torch.load(tmp / "o.pt")
            hf_astroquant.set_backend(model, "reference")
            exact = AutoModelForCausalLM.from_pretrained(
                str(tmp / "q"), dtype=torch.float32, quantization_config=hf_astroquant.AstroQuantConfig(backend="reference"))
            with torch.no_grad():
                ours = model(ids).logits.float()
                truth = exact(ids).logits
        row = {"config": name, "format": fmt, "tokens": int(ids.numel()),
               "gptqmodel_vs_ours_fp16": float(f"{rel(theirs, ours):.3g}"),
               "gptqmodel_vs_truth": float(f"{rel(theirs, truth):.3g}"),
               "ours_fp16_vs_truth": float(f"{rel(ours, truth):.3g}")}
        command = results_rows.command([__file__, "--configs", name], env=("GPTQMODEL_PYTHON",))
        results_rows.append_rows([results_rows.row("export", name, row, command=command)])


if __name__ == "__main__":
    main()
