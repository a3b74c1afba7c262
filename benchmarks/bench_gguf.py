"""GGUF files in llama.cpp: llama.cpp's own quantizer against ours, perplexity measured by llama.cpp.

    LLAMACPP_PYTHON=.ci/llamacpp-env/bin/python python benchmarks/bench_gguf.py [--rows NAME ...]

llama.cpp (`bash .ci/install_llamacpp.sh .ci/llamacpp-env`) runs in the Python named by
LLAMACPP_PYTHON. Protocol: SmolLM2-135M (the fp32 checkpoint of benchmarks/protocol.py), the 64 × 512
Python-docs calibration windows of the results table, perplexity over the first `--windows`
WikiText-2 test windows of 2048 tokens (the same token ids in llama.cpp and in PyTorch; llama.cpp with
its default F16 KV cache).

Rows:
- `llamacpp-TYPE`: our F16 GGUF of the full-precision model, quantized by llama.cpp's
  llama_model_quantize (no importance matrix);
- `imatrix-TYPE`: the same with llama.cpp's importance matrix (`llama-imatrix` over the text of our
  calibration windows, then `llama-quantize --imatrix`; both tools built from the llama.cpp sources
  the llama-cpp-python package ships, by `bash benchmarks/build_llamacpp_tools.sh`);
- `gptq-TYPE`: quantized with AstroQuantConfig(gguf_type=TYPE) (GPTQ, the defaults), exported;
- `best-TYPE`: the same with GPTAQ and Astro (`BEST`, no residual rotation);
- `preset-TYPE`: `AstroQuantConfig.recommended(bits, "best", gguf_type=TYPE)`, what
  `quantize --preset best --gguf-type TYPE` runs (bits: the type's main width, 2 to 4);
- `fp16`: the F16 file itself;
- `try-TYPE`: any options (`--options '{"method": "gptaq", ...}'`, AstroQuantConfig's keyword arguments),
  to the table `gguf-tries` under the label `try-TYPE-TAG` (`--tag`): how the GGUF presets were chosen.
Each row gives llama.cpp's perplexity, the file size, llama.cpp's greedy decode tokens/s (2 threads,
64 tokens after a 128-token prompt) and, for ours, our own PyTorch perplexity of the same weights
(embedding / output replaced by the file's), so `ppl_gap` is llama.cpp against PyTorch. `torch-int4`
is our PyTorch int4 path's decode speed (bench_speed.py's measure, W4 bf16) for reference; `decode`
measures llama.cpp's decode speed (128 tokens, median of 3 interleaved rounds) of every file made
so far again, in one sitting (run it last, on an otherwise idle machine: it replaces the decode
speed of each file's row).
`rounded`: for the files `--files` names (our GPTQ files by default), our PyTorch perplexity of
the file's own weights, plain and with llama.cpp's 8-bit rounding of each quantized matmul's input,
against llama.cpp's with an F32 KV cache: how much of the llama.cpp / PyTorch gap that rounding is.
Each row goes to the table `gguf` of benchmarks/results/rows.jsonl (results_rows.py; `rounded` to
`gguf-rounded`, not rendered).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from hf_astroquant.gguf.types import FILE_TYPES  # noqa: E402
from hf_astroquant.presets import gguf_preset_bits  # noqa: E402
import results_rows  # noqa: E402

TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
TRY_OPTIONS: dict = {}  # --options, for the `try-TYPE` rows
BEST = dict(method="gptaq", astro=True)
ROWS = (["fp16"] + [f"{kind}-{t}" for t in TYPES for kind in ("llamacpp", "imatrix", "gptq", "best", "preset")]
        + ["torch-int4", "decode", "rounded"])
WORK = protocol.CACHE / "bench-gguf"
TOOLS = protocol.CACHE / "llamacpp-tools" / "bin"  # llama-imatrix, llama-quantize: build_llamacpp_tools.sh


def f16_file() -> Path:
    from hf_astroquant.gguf.export import export_gguf

    path = WORK / "smollm2-f16.gguf"
    if not path.exists():
        export_gguf(protocol.smollm2_checkpoint(), path, "F16")
    return path


def ours(kind: str, file_type: str, windows: torch.Tensor) -> tuple[Path, object, float]:
    """(GGUF path, the quantized model, seconds from_pretrained took) for one of our rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant import AstroQuantConfig
    from hf_astroquant.gguf.export import export_gguf

    ckpt = protocol.smollm2_checkpoint()
    if kind == "preset":
        cfg = AstroQuantConfig.recommended(gguf_preset_bits(file_type), "best", gguf_type=file_type, dataset=windows)
    elif kind == "try":
        cfg = AstroQuantConfig(gguf_type=file_type, dataset=windows, **TRY_OPTIONS)
    else:
        cfg = AstroQuantConfig(gguf_type=file_type, dataset=windows, **(BEST if kind == "best" else {}))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=cfg)
    seconds = time.perf_counter() - start
    path = WORK / f"smollm2-{kind}-{file_type}.gguf"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(ckpt).save_pretrained(d)
        path.unlink(missing_ok=True)  # this benchmark's own file (an older version's has no mark to replace it by)
        export_gguf(d, path)
    return path, model, seconds


def with_file_embeddings(model, path: Path):
    """The model with its embedding / output matrices replaced by what the file holds."""
    import gguf
    import numpy as np

    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    with torch.no_grad():
        for key, param in (("token_embd.weight", model.get_input_embeddings().weight),
                           ("output.weight", model.get_output_embeddings().weight)):
            if key in stored:
                t = stored[key]
                param.copy_(torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(param.shape))
    return model


def llamacpp_tool(name: str, *args: str) -> float:
    """Run one of llama.cpp's command-line tools; the seconds it took."""
    exe = TOOLS / name
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: build it with `bash benchmarks/build_llamacpp_tools.sh`")
    start = time.perf_counter()
    done = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def imatrix_file(tok, calib: torch.Tensor) -> tuple[Path, float]:
    """(llama.cpp's importance matrix of the F16 file, the seconds llama-imatrix took), over the text of
    our calibration windows: llama-imatrix tokenizes it again and takes 512-token chunks, as many as we
    have windows. Computed once, then read back (with its seconds) for every imatrix row."""
    path, record = WORK / "smollm2-f16.imatrix.gguf", WORK / "smollm2-f16.imatrix.json"
    text = "\n\n".join(tok.decode(w) for w in calib)
    done = json.loads(record.read_text()) if path.exists() and record.exists() else {}
    if done.get("text_chars") == len(text):
        return path, done["seconds"]
    (WORK / "calibration.txt").write_text(text)
    seconds = llamacpp_tool("llama-imatrix", "-m", str(f16_file()), "-f", str(WORK / "calibration.txt"), "-c",
                            str(calib.shape[1]), "--chunks", str(calib.shape[0]), "-t", "2", "--no-ppl", "-o", str(path))
    record.write_text(json.dumps({"seconds": round(seconds, 1), "text_chars": len(text)}))
    return path, round(seconds, 1)


def measure_file(path: Path, windows: torch.Tensor, prompt: list[int]) -> dict:
    from engines import llamacpp_harness as llamacpp

    ppl = llamacpp.perplexity(path, windows)
    speed = llamacpp.decode_speed(path, prompt, new_tokens=64)
    return {"llamacpp_ppl": round(ppl["perplexity"], 3), "file_mib": round(path.stat().st_size / 2**20, 2),
            "decode_tok_s": round(speed["tokens_per_second"], 1)}


def rounding_explains_the_gap(windows: torch.Tensor, pattern: str) -> dict:
    """For every file of the bench's folder that `pattern` matches: our PyTorch perplexity of the file's own weights (decoded by
    gguf-py, llama.cpp's quantizer's files included), plain and with each Linear's input rounded to 8 bits
    as llama.cpp's quantized matmul rounds it, and llama.cpp's with an F32 KV cache (no other rounding)."""
    from transformers import AutoModelForCausalLM

    from hf_astroquant.eval import perplexity
    from hf_astroquant.gguf.read import weights_from_gguf
    from engines import llamacpp_harness as llamacpp

    out = {}
    for path in sorted(WORK.glob(pattern)):
        model = AutoModelForCausalLM.from_pretrained(protocol.smollm2_checkpoint(), dtype=torch.float32).eval()
        weights, types = weights_from_gguf(path, model)
        model.load_state_dict(weights, strict=False)
        ppl = lambda: round(perplexity(model, windows.reshape(-1), 2048, progress=False), 3)  # noqa: E731
        plain = ppl()
        with llamacpp.llamacpp_activations(model, types):
            rounded = ppl()
        theirs = round(llamacpp.perplexity(path, windows, f32_kv_cache=True)["perplexity"], 3)
        out[path.stem.removeprefix("smollm2-")] = {"torch_ppl": plain, "torch_rounded_ppl": rounded,
                                                   "llamacpp_f32kv_ppl": theirs}
        print(path.name, out[path.stem.removeprefix("smollm2-")], flush=True)
    return out


def run_row(name: str, test_windows: torch.Tensor, calib: torch.Tensor, prompt: list[int], tok,
            files: str) -> dict:
    from hf_astroquant.eval import perplexity
    from engines import llamacpp_harness as llamacpp

    row: dict = {"row": name}
    if name == "torch-int4":
        import bench_speed

        r = bench_speed.measure("smollm2", "w4", "bf16", "auto")
        return dict(row, decode_tok_s=r["decode_tok_s"], backends=r["active_backends"])
    if name == "decode":  # every file made so far, in one quiet sitting: median of 3 interleaved rounds
        paths = sorted(WORK.glob("*.gguf"))
        rounds = [[llamacpp.decode_speed(f, prompt, new_tokens=128)["tokens_per_second"] for f in paths]
                  for _ in range(3)]
        speeds = {f.stem.removeprefix("smollm2-"): round(statistics.median(r[i] for r in rounds), 1)
                  for i, f in enumerate(paths)}
        return dict(row, decode_tok_s=speeds, new_tokens=128, rounds=3)
    if name == "rounded":
        return dict(row, files=rounding_explains_the_gap(test_windows, files))
    if name == "fp16":
        return dict(row, **measure_file(f16_file(), test_windows, prompt))
    kind, file_type = name.split("-", 1)
    row["gguf_type"] = file_type
    if kind == "llamacpp":
        path = WORK / f"smollm2-llamacpp-{file_type}.gguf"
        row["quant_seconds"] = round(llamacpp.quantize(f16_file(), path, file_type)["seconds"], 1)
        return dict(row, **measure_file(path, test_windows, prompt))
    if kind == "imatrix":  # llama.cpp's quantizer weighted by its importance matrix of our calibration text
        imatrix, imatrix_seconds = imatrix_file(tok, calib)
        path = WORK / f"smollm2-imatrix-{file_type}.gguf"
        seconds = llamacpp_tool("llama-quantize", "--imatrix", str(imatrix), str(f16_file()), str(path), file_type, "2")
        row.update(quant_seconds=round(imatrix_seconds + seconds, 1), imatrix_seconds=round(imatrix_seconds, 1))
        return dict(row, **measure_file(path, test_windows, prompt))
    path, model, seconds = ours(kind, file_type, calib)
    row["quant_seconds"] = round(seconds, 1)
    q = model.config.quantization_config
    row["options"] = BEST if kind == "best" else {}
    if kind == "preset":  # what the preset became on this model, for this file
        row["preset"] = dict(q.preset)
        row["ran"] = {"method": q.method, "transform": (q.transforms_applied or {}).get("transform", "none"),
                      "astro": q.astro, "damp_percent": q.damp_percent, "refine_steps": q.refine_steps,
                      "refine_rounding_lr": q.refine_rounding_lr}
    row.update(measure_file(path, test_windows, prompt))
    row["torch_ppl"] = round(perplexity(with_file_embeddings(model, path), test_windows.reshape(-1), 2048,
                                        progress=False), 3)
    row["ppl_gap"] = round(row["llamacpp_ppl"] / row["torch_ppl"] - 1, 5)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS, help=f"any of {ROWS}")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 2048 tokens")
    ap.add_argument("--options", default="{}", help="try-TYPE rows: AstroQuantConfig options as JSON")
    ap.add_argument("--tag", default="", help="try-TYPE rows: the label's suffix")
    ap.add_argument("--files", default="smollm2-gptq-*.gguf",
                    help="the `rounded` row's files (a pattern in the bench's cache folder); every quantized one: "
                         "'smollm2-*-*.gguf'")
    args = ap.parse_args()
    TRY_OPTIONS.update(json.loads(args.options))
    unknown = sorted(r for r in set(args.rows) - set(ROWS) if not (r.startswith("try-") and r[4:] in FILE_TYPES))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    from transformers import AutoTokenizer

    from engines import llamacpp_harness as llamacpp

    if llamacpp.unavailable_reason():
        raise SystemExit(llamacpp.unavailable_reason())
    WORK.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(protocol.smollm2_checkpoint())
    ids = protocol.wikitext_test_ids(tok)
    test_windows = ids[: args.windows * 2048].reshape(args.windows, 2048)
    calib = protocol.calibration_windows(tok, "out")
    prompt = ids[-128:].tolist()
    for name in args.rows:
        row = run_row(name, test_windows, calib, prompt, tok, args.files)
        row.update(ppl_windows=args.windows, threads=2)
        command = results_rows.command([__file__, "--rows", name, "--windows", str(args.windows)]
                                       + ["--files", args.files] * (name == "rounded")
                                       + ["--options", args.options, "--tag", args.tag] * name.startswith("try-"),
                                       env=("LLAMACPP_PYTHON",))
        if name == "decode":  # a later measurement of each file's decode speed: updates that column of its row
            rows = [results_rows.row("gguf", "fp16" if stem == "f16" else stem, {"decode_tok_s": speed}, command=command)
                    for stem, speed in row["decode_tok_s"].items()]
            results_rows.append_rows(rows, merge=True)
        elif name.startswith("try-"):
            row["options"] = TRY_OPTIONS
            results_rows.append_rows([results_rows.row("gguf-tries", f"{name}-{args.tag}", row, command=command)])
        else:
            table = "gguf-rounded" if name == "rounded" else "gguf"
            results_rows.append_rows([results_rows.row(table, name, row, command=command)])


if __name__ == "__main__":
    main()
