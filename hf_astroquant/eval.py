"""Perplexity by the GPTQ protocol: non-overlapping windows of `seqlen` tokens over one long
token sequence, mean next-token NLL over all predicted positions, exp."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model_limits import check_token_ids, check_window_length


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> float:
    """exp(mean NLL) of `model` over `token_ids` (1-D) cut into windows of `seqlen` tokens."""
    if not isinstance(seqlen, int) or seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"seqlen={seqlen!r} and max_windows={max_windows!r}: allowed are integers >= 1 "
                         "(max_windows also None: every window)")
    ids = token_ids.reshape(-1)
    check_token_ids(ids, model, "evaluation text")
    check_window_length(seqlen, model, "seqlen")
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seqlen={seqlen}")
    device = model.get_input_embeddings().weight.device
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += seqlen - 1
    return math.exp(total_nll / total_tokens)


def stdlib_docs_text(part: int = 0, parts: int = 2) -> str:
    """English prose that ships with every Python: docstrings of standard-library modules.

    Modules are split into `parts` disjoint shares (by sorted name) so that one share can
    calibrate and another evaluate; for offline smoke tests and demos, not for reported numbers.
    """
    import importlib
    import inspect
    import pkgutil
    import sys
    import warnings

    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_"))
    available = {m.name for m in pkgutil.iter_modules()}
    chunks = []
    for name in names[part::parts]:
        if name not in available and name not in sys.builtin_module_names:
            continue
        if name in ("antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "ensurepip", "venv"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform-specific modules
            continue
        doc = inspect.getdoc(module)
        if doc:
            chunks.append(doc)
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                d = inspect.getdoc(obj)
                if d and len(d) > 200:
                    chunks.append(d)
    return "\n\n".join(chunks)


EVAL_DATASET_NAMES = ("wikitext2", "wikitext2-raw")
SHIPPED_WIKITEXT2_TEST = Path(__file__).parent / "data" / "wiki.test.raw.gz"


def evaluation_text(data: str) -> tuple[str, str]:
    """(text, description) of evaluation data:

    - "wikitext2": the WikiText-2 raw test split through `datasets` (Hub), its rows joined by blank
      lines as GPTQ's evaluation does;
    - "wikitext2-raw": the released `wiki.test.raw` file itself, shipped with hf_astroquant (offline;
      the text of the README's numbers; it tokenizes slightly differently from "wikitext2");
    - a local text file.
    """
    if os.path.isfile(data):
        from .calibration import read_text_file

        text = read_text_file(data, "evaluation")
        if not text.strip():
            raise ValueError(f"evaluation file {data} contains no text")
        return text, f"text file {os.path.basename(data)}"
    if data == "wikitext2-raw":
        with gzip.open(SHIPPED_WIKITEXT2_TEST, "rt", encoding="utf-8") as f:  # universal newlines
            return f.read(), "WikiText-2 test (wiki.test.raw)"
    if data == "wikitext2":
        from . import hub_access

        hint = "Offline, use 'wikitext2-raw' (shipped with hf_astroquant) or a local text file."
        reason = hub_access.unreachable_reason()
        if reason:
            raise ValueError(f"evaluation data 'wikitext2' is read from the Hugging Face Hub, but {reason}. {hint}")
        import datasets

        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as exc:  # network errors come in many types
            raise ValueError(f"could not load WikiText-2 with datasets.load_dataset ({type(exc).__name__}: {exc}). "
                             f"{hint}") from exc
        return "\n\n".join(ds["text"]), "WikiText-2 test"
    raise ValueError(f"evaluation data {data!r} is neither an existing text file nor one of "
                     f"{', '.join(EVAL_DATASET_NAMES)}")


def lm_eval_scores(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1) -> dict:
    """Scores of lm-evaluation-harness `tasks` on an already loaded model: {"task/metric": value}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError("lm-eval tasks need the lm-evaluation-harness: pip install lm-eval") from err
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                      tasks=list(tasks), limit=limit)
    scores = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none") and name != "alias":
                scores[f"{task}/{name.replace(',none', '')}"] = float(value)
    return scores
