"""Inference speed and memory of packed models against full precision, same process, same prompts.

    python benchmarks/bench_speed.py   # the table `speed` of benchmarks/results/rows.jsonl

Models: SmolLM2-135M (the protocol's checkpoint) and a synthetic TinyLlama-shaped model (1.1 B
parameters, random weights: quality is irrelevant, memory bandwidth dominates). Each is measured
in full precision (fp32, bf16) and packed at 4/3/2 bits (group 64). Speed does not depend on the
solver, so the packed checkpoints are made with round-to-nearest (seconds instead of minutes);
they have exactly the layout and forward path of a GPTQ checkpoint.

Each row runs in a fresh process: load (peak RSS after loading), decode tokens/s at batch 1
(greedy generate of 64 new tokens after a 32-token prompt, minus the prompt's own forward),
prefill tokens/s (one forward of batch x seqlen), checkpoint bytes on disk.

    python benchmarks/bench_speed.py --device cuda   # the table `speed-cuda` (not rendered)

runs the GPU rows instead: fp16 and bf16 against 4/3/2 bits with fp16 activations (the Triton
kernel) and 4 bits with bf16 activations (the aten int4 kernel), plus peak GPU memory. The model is
loaded on CPU and moved to the GPU, where each packed layer prepares its CUDA path on first use.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

SYNTH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
PREFILL = {"smollm2": (16, 512), "synthetic-1.1b": (1, 512)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_checkpoint() -> str:
    out = protocol.CACHE / "synthetic-llama-1.1b-fp32"
    if (out / "config.json").exists():
        return str(out)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SYNTH)).eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def fp_checkpoint(model: str) -> str:
    return protocol.smollm2_checkpoint() if model == "smollm2" else synthetic_checkpoint()


def packed_checkpoint(model: str, bits: int) -> str:
    """Round-to-nearest, group 64, asymmetric: the GPTQ layout without the minutes of calibration."""
    out = protocol.CACHE / f"speed-{model}-w{bits}g64"
    if (out / "config.json").exists():
        return str(out)
    import hf_astroquant
    from transformers import AutoModelForCausalLM

    cfg = hf_astroquant.AstroQuantConfig(bits=bits, group_size=64, method="rtn")
    m = AutoModelForCausalLM.from_pretrained(fp_checkpoint(model), dtype=torch.float32, quantization_config=cfg)
    tmp = out.with_name(out.name + ".tmp")
    m.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(model_name: str, variant: str, dtype_name: str, backend: str, device: str = "cpu") -> dict:
    import hf_astroquant
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name]
    if variant == "fp":
        path = fp_checkpoint(model_name)
        kw = {}
    else:
        path = packed_checkpoint(model_name, int(variant[1:]))
        kw = {"quantization_config": hf_astroquant.AstroQuantConfig(backend=backend)}
    rss_before = rss_gib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval().to(device)
    row = {"model": model_name, "variant": variant, "dtype": dtype_name, "load_seconds": round(time.perf_counter() - start, 1),
           "load_peak_rss_gib": round(rss_gib(), 2), "rss_before_load_gib": round(rss_before, 2)}
    cuda = device == "cuda"
    if cuda:
        row["device"] = torch.cuda.get_device_name()
        row["gpu_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    if variant != "fp":
        row["backend"] = backend
    row["checkpoint_gib"] = round(sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**30, 3)

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 32), generator=g).to(device)
    new = 64

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        def gen(n):
            sync()
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync()
            return time.perf_counter() - t

        gen(4)  # warm-up (on CUDA this also runs the Triton autotuner for the decode shapes)
        t_all = min(gen(new + 1) for _ in range(2))
        t_prompt = min(gen(1) for _ in range(3))
        row["decode_tok_s"] = round(new / (t_all - t_prompt), 2)
        b, s = PREFILL[model_name]
        ids = torch.randint(0, vocab, (b, s), generator=g).to(device)
        model(ids[:1, :64], use_cache=False)  # warm-up
        if cuda:
            model(ids, use_cache=False, logits_to_keep=1)  # the autotuner's prefill shapes
        sync()
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        sync()
        row["prefill_tok_s"] = round(b * s / (time.perf_counter() - t), 1)
        row["prefill_shape"] = f"{b}x{s}"
    if variant != "fp":  # read after the forwards: a layer picks its kernel when it first runs
        layers = [m for m in model.modules() if isinstance(m, hf_astroquant.QuantLinear)]
        row["active_backends"] = sorted({str(m.active_backend) for m in layers})
    row["peak_rss_gib"] = round(rss_gib(), 2)
    if cuda:
        row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    row.update(torch_threads=torch.get_num_threads(), torch=torch.__version__)
    return row


ROWS = [(m, v, d) for m in ("smollm2", "synthetic-1.1b")
        for v, d in (("fp", "fp32"), ("fp", "bf16"), ("w4", "fp32"), ("w4", "bf16"), ("w3", "bf16"), ("w2", "bf16"))]
CUDA_ROWS = [(m, v, d) for m in ("smollm2", "synthetic-1.1b")
             for v, d in (("fp", "fp16"), ("fp", "bf16"), ("w4", "fp16"), ("w4", "bf16"), ("w3", "fp16"), ("w2", "fp16"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "synthetic-1.1b"], choices=["smollm2", "synthetic-1.1b"])
    ap.add_argument("--backend", default="auto", help="forward path of the packed rows (auto, reference, int4, int8, triton)")
    ap.add_argument("--table", help="the table of benchmarks/results/rows.jsonl the rows go to (default: speed, "
                                    "with --device cuda speed-cuda)")
    ap.add_argument("--sitting", help="label of the sitting, recorded in each row (default: the date)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the rows run (default: cpu)")
    ap.add_argument("--build-only", action="store_true", help="build the checkpoints, measure nothing")
    ap.add_argument("--row", nargs=3, metavar=("MODEL", "VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device on this machine")
    args.table = args.table or ("speed-cuda" if args.device == "cuda" else "speed")
    if args.row:
        row = measure(*args.row, args.backend, args.device)
        label = " ".join(args.row) + (f" {args.backend}" if args.backend != "auto" else "")
        command = results_rows.command([__file__, "--models", args.row[0], "--backend", args.backend, "--device",
                                        args.device, "--table", args.table])
        results_rows.append_rows([results_rows.row(args.table, label, row, command=command, sitting=args.sitting)])
        return
    for model in args.models:  # build the checkpoints first, outside the measured processes
        fp_checkpoint(model)
        for bits in (4, 3, 2):
            packed_checkpoint(model, bits)
    if args.build_only:
        return
    for model, variant, dtype in CUDA_ROWS if args.device == "cuda" else ROWS:
        if model in args.models:
            subprocess.run([sys.executable, __file__, "--row", model, variant, dtype, "--backend", args.backend,
                            "--device", args.device, "--table", args.table]
                           + ["--sitting", args.sitting] * bool(args.sitting), check=True)


if __name__ == "__main__":
    main()
