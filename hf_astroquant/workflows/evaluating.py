"""`evaluate`: perplexity and lm-eval tasks of a saved model, recorded in its report and card."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import output_dir
from ..config import AstroQuantConfig
from ..file_modes import snapshot, written_since
from ..report import measurements_record
from .sources import WorkflowError, _check_run_arguments, _is_path, _load_fp, _tokenizer_of, resolve_source


@dataclass
class EvalResult:
    directory: Path
    perplexity: dict[str, Any] | None  # data, seqlen, windows, quantized (and base with a baseline); None without data
    lm_eval: dict[str, float] | None  # {"task/metric": value}; None without tasks
    report: dict[str, Any]  # the directory's report with these measurements (saved there when write=True)
    rows: list[tuple[str, Any]]  # the table `hf-astroquant eval` prints


def evaluate(directory: str | os.PathLike, *, data: str | os.PathLike | None = "wikitext2", seqlen: int = 2048,
             max_windows: int | None = None, baseline: str | os.PathLike | None = None, dtype: str = "float32",
             tokenizer: Any = None, backend: str | None = None, tasks: str | Iterable[str] | None = None,
             limit: int | None = None, batch_size: int = 1, write: bool = True) -> EvalResult:
    """Perplexity (GPTQ protocol) of the model saved in `directory` on `data` ("wikitext2",
    "wikitext2-raw", a text file, or None), in windows of `seqlen` tokens (at most `max_windows`), and
    of the full-precision `baseline` (a Hub id, directory or .gguf file, loaded in `dtype`); and the
    lm-eval `tasks` (a list, or comma-separated; needs lm-eval), at most `limit` examples each
    (`hf-astroquant eval`). `tokenizer`: a name, a directory or a loaded tokenizer (default: the
    directory's own); `backend`: the packed layers' forward path. With `write` (as the shell does
    unless --no-write) the results go into the directory's report and, when the card is ours, its card."""
    from transformers import AutoModelForCausalLM

    from ..eval import lm_eval_scores
    from ..export.card import read_report

    _check_run_arguments(dtype, seqlen=seqlen, max_windows=max_windows, limit=limit, batch_size=batch_size)
    tasks = (tasks.split(",") if tasks else []) if isinstance(tasks, str) else list(tasks or [])
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise WorkflowError(f"{directory} is not a saved model directory (no config.json)")
    if not data and not tasks:
        raise WorkflowError("nothing to evaluate: pass --data (default wikitext2) or --tasks")
    load = {}
    if backend:
        load["quantization_config"] = AstroQuantConfig(backend=backend)
    if tokenizer is None or _is_path(tokenizer):
        name = os.fspath(tokenizer or directory)
        tok = _tokenizer_of(name, name, {}, needed=True)
    else:
        tok = tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(directory), **load)
    report = read_report(directory)
    rows: list[tuple[str, Any]] = [("model", str(directory))]
    ppl = scores = None
    if data:
        ppl, measured = _perplexities(model, tok, data, seqlen, max_windows, baseline, dtype, report.get("perplexity"))
        rows += measured
    if tasks:
        scores = lm_eval_scores(model, tok, tasks, limit, batch_size)
        rows += [(f"lm-eval {k}", f"{v:.4f}") for k, v in sorted(scores.items())]
    report = measurements_record(report, perplexity=ppl, lm_eval=scores)
    if write:
        _record(directory, report)
    return EvalResult(directory=directory, perplexity=ppl, lm_eval=scores, report=report, rows=rows)


def _perplexities(model, tok, data, seqlen: int, max_windows: int | None, baseline, dtype: str, earlier: dict | None):
    """(the perplexity record, its rows): the model's on `data`, and the baseline's; an `earlier` record
    on the same text and windows (the base model's perplexity from quantize) is kept and updated."""
    from ..eval import evaluation_text, perplexity

    text, what = evaluation_text(os.fspath(data))
    ids = tok(text, return_tensors="pt").input_ids[0]
    ppl = dict(earlier or {})
    if ppl.get("data") != what or ppl.get("seqlen") != seqlen:
        ppl = {}  # a perplexity on other text or windows is not comparable: start over
    ppl.update({"data": what, "seqlen": seqlen, "windows": min(ids.numel() // seqlen, max_windows or 10**9)})
    ppl["quantized"] = perplexity(model, ids, seqlen, max_windows)
    rows = [(f"perplexity ({what}, seqlen {seqlen})", f"{ppl['quantized']:.2f}")]
    if baseline:
        source, load_kwargs, _ = resolve_source(baseline)
        base = _load_fp(source, load_kwargs, dtype, {})
        ppl["base"] = perplexity(base, ids, seqlen, max_windows)
        rows.append((f"perplexity, baseline {os.fspath(baseline)}", f"{ppl['base']:.2f}"))
        del base
    return ppl, rows


def _record(directory: Path, report: dict) -> None:
    """Save `report` in `directory`, re-render its card when the card is ours, and list the files written
    in its manifest (so --overwrite still recognises the folder as ours)."""
    from ..export.card import is_ours, write_card, write_report

    before = snapshot(directory)
    write_report(directory, report)
    if is_ours(directory / "README.md"):
        write_card(directory)
    output_dir.record_written(directory, written_since(directory, before))
