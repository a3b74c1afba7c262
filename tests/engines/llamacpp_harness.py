"""Run a GGUF file in llama.cpp as a user would: logits, perplexity, tokenization, llama.cpp's own
quantizer and decode speed. llama.cpp runs through llama-cpp-python in its own Python (a source
build: `.ci/install_llamacpp.sh ENV`), named by LLAMACPP_PYTHON, else the checkout's
.ci/llamacpp-env, else this interpreter if it has llama_cpp.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

WORKER = Path(__file__).with_name("llamacpp_worker.py")
# tests/engines/ is two folders below the checkout, whose .ci/run builds this environment
CHECKOUT_ENV = Path(__file__).resolve().parents[2] / ".ci" / "llamacpp-env" / "bin" / "python"


@functools.lru_cache(maxsize=1)
def llamacpp_python() -> str | None:
    """The interpreter that imports llama_cpp, or None."""
    candidates = [os.environ.get("LLAMACPP_PYTHON"), str(CHECKOUT_ENV) if CHECKOUT_ENV.exists() else None]
    for exe in filter(None, candidates):
        try:
            if subprocess.run([exe, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0:
                return exe
        except (OSError, subprocess.TimeoutExpired):
            pass
    return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None


def unavailable_reason() -> str | None:
    if llamacpp_python() is None:
        return ("llama.cpp is not installed here: bash .ci/install_llamacpp.sh ENV, then set "
                "LLAMACPP_PYTHON=ENV/bin/python (.ci/run does)")
    return None


def run_task(task: str, timeout: float = 1800, **request) -> dict:
    """llamacpp_worker.py's result for one task ({"task": task, **request})."""
    python = llamacpp_python()
    if python is None:
        raise RuntimeError(unavailable_reason())
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"task": task, "out": str(Path(tmp) / "arrays"), **request}))
        env = dict(os.environ, OMP_NUM_THREADS=str(request.get("threads", 2)))
        proc = subprocess.run([python, str(WORKER), str(req), str(res)], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp task {task!r} failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        result = json.loads(res.read_text())
        if task == "logits":
            arrays = np.load(str(Path(tmp) / "arrays") + ".npz")
            result["logits"] = [arrays[f"arr_{i}"] for i in range(len(request["ids"]))]
        return result


def logits(path: str | Path, ids: list[list[int]], threads: int = 2, f32_kv_cache: bool = True) -> list[np.ndarray]:
    """llama.cpp's logits, one (len(seq), n_vocab) array per id sequence."""
    return run_task("logits", model=str(path), ids=[list(map(int, s)) for s in ids], threads=threads,
                    f32_kv_cache=f32_kv_cache)["logits"]


def perplexity(path: str | Path, windows, threads: int = 2, f32_kv_cache: bool = False) -> dict:
    """{"perplexity", "nll", "count"} over `windows` (a list of id lists or a 2-D tensor), counting
    every token after the first of each window, as our own eval does. The KV cache is llama.cpp's
    default F16 unless `f32_kv_cache`."""
    rows = windows.tolist() if hasattr(windows, "tolist") else [list(map(int, w)) for w in windows]
    return run_task("perplexity", model=str(path), windows=rows, threads=threads, f32_kv_cache=f32_kv_cache)


def tokenize(path: str | Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids of each text (BOS added as the file says; special tokens parsed)."""
    return run_task("tokenize", model=str(path), texts=list(texts))["tokens"]


def quantize(source: str | Path, dest: str | Path, file_type: str, threads: int = 2) -> dict:
    """llama.cpp's own quantizer: `source` (an F16/F32 GGUF) to `dest` as `file_type` (a name of
    gguf.types.FILE_TYPES, e.g. "Q4_K_M"); returns {"seconds"}."""
    from hf_astroquant.gguf.types import FILE_TYPES

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r} is not valid; allowed: {', '.join(FILE_TYPES)}")
    return run_task("quantize", model=str(source), dest=str(dest), ftype=FILE_TYPES[file_type][1], threads=threads)


def decode_speed(path: str | Path, prompt_ids: list[int], new_tokens: int = 64, threads: int = 2) -> dict:
    """{"tokens_per_second", "seconds"} of a greedy decode of `new_tokens` tokens after the prompt."""
    return run_task("decode_speed", model=str(path), prompt_ids=list(map(int, prompt_ids)), new_tokens=new_tokens,
                    threads=threads)


# llama.cpp's CPU matmul of a quantized weight first rounds each activation row to 8 bits in blocks:
# Q8_0 (32 values, fp16 scale) for the 32-column types, Q8_K (256 values, fp32 scale) for the
# K-quants; F32 weights see the activations as they are.
ACTIVATION_BLOCKS = {"Q4_0": (32, True), "Q4_1": (32, True), "Q5_0": (32, True), "Q5_1": (32, True),
                     "Q8_0": (32, True), "Q2_K": (256, False), "Q3_K": (256, False), "Q4_K": (256, False),
                     "Q5_K": (256, False), "Q6_K": (256, False)}


def round_activations(x: torch.Tensor, block: int, fp16_scale: bool) -> torch.Tensor:
    """x rounded as llama.cpp's Q8_0 / Q8_K quantize_row does: per block, d = max|x| / 127, q = round(x / d)."""
    v = x.float().reshape(-1, block)
    d = v.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(v * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return (q * (d.half().float() if fp16_scale else d)).reshape(x.shape).to(x.dtype)


class llamacpp_activations:  # noqa: N801 (a context manager, used as a function)
    """Within this context, every Linear of `model` whose weight llama.cpp holds as a quantized type
    (`types`: module name → tensor type name) sees its input rounded as llama.cpp rounds it (an
    embedding's lookup is exact in llama.cpp: it is left alone)."""

    def __init__(self, model, types: dict[str, str]):
        self.handles = []
        for name, module in model.named_modules():
            if types.get(name) in ACTIVATION_BLOCKS and hasattr(module, "in_features"):  # not the embedding
                block, fp16 = ACTIVATION_BLOCKS[types[name]]
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, block=block, fp16=fp16: (round_activations(args[0], block, fp16),)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
