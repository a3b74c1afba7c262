"""Run a saved model in vLLM and report what a user would measure: perplexity and greedy text.

Run with a Python that has vLLM (it imports nothing of hf_astroquant, which that Python may lack):

    python vllm_worker.py MODEL_DIR REQUEST.json RESULT.json

REQUEST.json: {"windows": [[token ids], ...], "prompt": "text", "max_new_tokens": 24, "dtype": "float16"}.
RESULT.json: {"nll": Σ −log p over every predicted token, "tokens": their number, "perplexity",
"text": the greedy continuation of the prompt, "seconds": {"start", "perplexity", "generate"}}.
Perplexity follows the GPTQ protocol: each window is scored on its own, every token after its first.
"""

import json
import math
import sys
import time


def main(model_dir: str, request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(open(request_path).read())
    t0 = time.time()
    llm = LLM(model=model_dir, dtype=request.get("dtype", "float16"), max_model_len=request.get("max_model_len", 1024),
              enforce_eager=True, max_num_seqs=4, seed=0)
    t1 = time.time()
    scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in request["windows"]],
                          SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0), use_tqdm=False)
    nll, tokens = 0.0, 0
    for window, out in zip(request["windows"], scored):
        for position, token in enumerate(window[1:], start=1):
            nll -= out.prompt_logprobs[position][token].logprob
            tokens += 1
    t2 = time.time()
    greedy = llm.generate([request["prompt"]], SamplingParams(max_tokens=request.get("max_new_tokens", 24),
                                                             temperature=0.0), use_tqdm=False)
    t3 = time.time()
    result = {"nll": nll, "tokens": tokens, "perplexity": math.exp(nll / tokens), "text": greedy[0].outputs[0].text,
              "seconds": {"start": t1 - t0, "perplexity": t2 - t1, "generate": t3 - t2}}
    open(result_path, "w").write(json.dumps(result, indent=2))


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main(*sys.argv[1:4])
