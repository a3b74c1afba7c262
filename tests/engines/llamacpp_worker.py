"""Runs inside llama-cpp-python's own Python (see llamacpp_harness.py): one JSON request in, one
result out. Tasks: logits of id sequences, perplexity over windows, tokenization, llama.cpp's own
quantizer, and greedy decode speed.

(Not named llama_cpp.py: run as a script from this folder, that name would shadow the package.)
"""

import json
import math
import sys
import time

import numpy as np


def _model(req, n_ctx, logits_all):
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if req.get("f32_kv_cache") else {}  # 0 = F32: exact keys and values
    return Llama(model_path=req["model"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                 verbose=False, n_threads=req.get("threads", 2), seed=0, **kv)


def logits(req):
    llm = _model(req, max([len(i) for i in req["ids"]] + [64]) + 8, True)
    out = []
    for ids in req["ids"]:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    np.savez(req["out"] + ".npz", *out)
    return {"n_vocab": llm.n_vocab()}


def perplexity(req):
    """Σ −log p of every token after the first in each window (the same count as our own eval)."""
    windows = req["windows"]
    llm = _model(req, max(len(w) for w in windows) + 8, True)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        z = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return {"nll": nll, "count": count, "perplexity": math.exp(nll / count)}


def tokenize(req):
    llm = _model(req, 64, False)
    return {"tokens": [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in req["texts"]]}


def quantize(req):
    """llama.cpp's own quantizer (llama_model_quantize), optionally with an importance matrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(req["ftype"])
    params.nthread = int(req.get("threads", 2))
    if req.get("imatrix"):
        raise ValueError("imatrix-weighted quantization is not exposed by llama-cpp-python's llama_model_quantize")
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(req["model"].encode(), req["dest"].encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"seconds": time.time() - t0}


def decode_speed(req):
    """Greedy decode of `new_tokens` tokens after `prompt_ids`; tokens/s of the decode alone."""
    llm = _model(req, len(req["prompt_ids"]) + req["new_tokens"] + 8, True)
    llm.eval(req["prompt_ids"])
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(req["new_tokens"]):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    seconds = time.perf_counter() - t0
    return {"tokens_per_second": req["new_tokens"] / seconds, "seconds": seconds}


TASKS = {"logits": logits, "perplexity": perplexity, "tokenize": tokenize, "quantize": quantize,
         "decode_speed": decode_speed}

if __name__ == "__main__":
    request = json.load(open(sys.argv[1]))
    result = TASKS[request["task"]](request)
    json.dump(result, open(sys.argv[2], "w"))
