"""The vLLM harness counts what our perplexity counts, and says why it cannot run where it cannot.

vLLM itself runs in integration_tests/test_vllm.py; here a stand-in `vllm` package (the three
names the worker uses, answering from a tiny model of ours) runs the real worker script, so its
bookkeeping is checked on every machine.
"""

import sys
import textwrap

import pytest
import torch

from hf_astroquant.eval import perplexity
from engines import vllm_harness as vllm
from tiny import calib_ids, save_tiny, tiny_llama

FAKE_VLLM = '''
import math
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM


class SamplingParams:
    def __init__(self, prompt_logprobs=None, max_tokens=16, temperature=1.0):
        self.prompt_logprobs, self.max_tokens = prompt_logprobs, max_tokens


class LLM:
    def __init__(self, model, **kw):
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for p in prompts:
            if isinstance(p, str):  # the greedy-text request: a fixed answer is enough here
                outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=" an answer")]))
                continue
            ids = torch.tensor(p["prompt_token_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(ids[None]).logits[0].float(), -1)
            # vLLM's shape: None for the first position, then {token: Logprob} for each later one
            lp = [None] + [{int(t): SimpleNamespace(logprob=float(logp[i - 1, t]))} for i, t in enumerate(ids) if i]
            outs.append(SimpleNamespace(prompt_logprobs=lp))
        return outs
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("VLLM_PYTHON", sys.executable)
    return tmp_path


def test_our_nll_is_our_perplexity():
    model = tiny_llama().eval()
    windows = calib_ids(3, 24, seed=2)
    nll, count = vllm.our_nll(model, windows)
    assert count == 3 * 23
    assert vllm.perplexity_of(nll, count) == pytest.approx(perplexity(model, windows.reshape(-1), 24, progress=False),
                                                           rel=1e-6)


def test_the_worker_counts_every_token_after_the_first_of_each_window(fake_vllm):
    save_tiny(fake_vllm / "m")
    windows = calib_ids(2, 20, seed=3)
    result = vllm.run_in_vllm(fake_vllm / "m", windows, "hello", max_new_tokens=4)
    ours = vllm.our_nll(tiny_llama().eval(), windows)  # save_tiny saves tiny_llama()'s weights
    assert result["tokens"] == ours[1] == 2 * 19
    assert result["nll"] == pytest.approx(ours[0], rel=1e-5)
    assert result["perplexity"] == pytest.approx(vllm.perplexity_of(*ours), rel=1e-5)
    assert result["text"] == " an answer" and set(result["seconds"]) == {"start", "perplexity", "generate"}


def test_a_failing_engine_is_reported_with_its_output(fake_vllm):
    with pytest.raises(RuntimeError, match=r"vLLM failed on .*nowhere \(exit 1\)"):
        vllm.run_in_vllm(fake_vllm / "nowhere", calib_ids(1, 8), "hi")


def test_unavailable_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    assert "no AVX-512" in vllm.unavailable_reason()
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    monkeypatch.setenv("VLLM_PYTHON", str(tmp_path / "no-python"))
    assert "vLLM is not installed" in vllm.unavailable_reason()
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        vllm.run_in_vllm(tmp_path, calib_ids(1, 8), "hi")
    monkeypatch.setenv("VLLM_PYTHON", sys.executable)
    assert vllm.unavailable_reason() is None


def test_the_worker_script_imports_only_the_standard_library_and_vllm():
    """It runs in vLLM's own Python, which need not have hf_astroquant (or our torch) installed."""
    import ast

    tree = ast.parse(vllm.WORKER.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"json", "math", "sys", "time", "vllm"}, imported
