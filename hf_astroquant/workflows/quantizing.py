"""`quantize`: a model (Hub id, directory or .gguf file) into a complete output folder."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import output_dir
from ..config import AstroQuantConfig
from ..report import measurements_record
from .sources import (WorkflowError, _check_run_arguments, _is_path, _load_fp, _placement, _tokenizer_of,
                      _torch_dtype, resolve_source)


@dataclass
class QuantizeResult:
    out: Path  # the output folder, complete
    model: Any  # the quantized model, still loaded
    config: AstroQuantConfig  # the config it ran with (its tokenizer loaded)
    seconds: float  # load + calibrate
    perplexity: dict[str, Any]  # with eval_data: data, seqlen, base, quantized, windows; else {}
    report: dict[str, Any]  # astroquant_report.json as saved in `out`
    rows: list[tuple[str, Any]]  # the summary `hf-astroquant quantize` prints


def quantize(model: str | os.PathLike, out: str | os.PathLike, config: AstroQuantConfig, *,
             eval_data: str | os.PathLike | None = None, eval_seqlen: int = 2048, eval_windows: int | None = None,
             dtype: str = "float32", device_map: str | None = None,
             max_memory: Mapping[Any, str] | Iterable[str] | None = None,
             offload_folder: str | os.PathLike | None = None, base_model: str | None = None,
             license: str | None = None, overwrite: bool = False) -> QuantizeResult:  # noqa: A002 (the card's key)
    """Quantize `model` (a Hub id, a local model directory or a local .gguf file) with `config` and save
    the packed checkpoint, its tokenizer, card and report in the folder `out` (`hf-astroquant quantize`).

    The tokenizer is `config.tokenizer` (a name, a directory or a loaded tokenizer), else `model`'s.
    With `eval_data` ("wikitext2-raw", "wikitext2" or a text file) the perplexity of the full-precision
    and of the quantized model is measured in windows of `eval_seqlen` tokens (at most `eval_windows`)
    and recorded. `device_map`, `max_memory` ({device: size}) and `offload_folder` place the model as
    from_pretrained does. `base_model` and `license` go into the card. `overwrite` replaces an earlier
    output of ours at `out`, never a folder it did not write.

    Under torchrun (or an initialized torch.distributed process group) every rank calls this: each
    calibrates on its share of the windows (distributed.py), and rank 0 alone evaluates and writes
    `out`; the other ranks return their model with an empty summary."""
    from .. import distributed

    with distributed.from_environment() as ranks:
        return _quantize(model, out, config, ranks, eval_data=eval_data, eval_seqlen=eval_seqlen,
                         eval_windows=eval_windows, dtype=dtype, device_map=device_map, max_memory=max_memory,
                         offload_folder=offload_folder, base_model=base_model, license=license, overwrite=overwrite)


def _quantize(model, out, config: AstroQuantConfig, ranks, *, eval_data, eval_seqlen, eval_windows, dtype,
              device_map, max_memory, offload_folder, base_model, license, overwrite) -> QuantizeResult:  # noqa: A002
    from ..calibration import check_source
    from ..eval import evaluation_text, perplexity
    from ..export.card import write_card

    _check_run_arguments(dtype, eval_seqlen=eval_seqlen, eval_windows=eval_windows)
    out, shown = Path(out), os.fspath(model)
    # every argument, the data included, is checked before anything is loaded
    source, load_kwargs, info = resolve_source(shown)
    if config.needs_calibration_data and config.dataset is None:
        raise WorkflowError(f"--method {config.method} needs calibration data: pass --dataset FILE|wikitext2|c4")
    check_source(config.dataset)
    eval_text = evaluation_text(os.fspath(eval_data)) if eval_data else None
    placement = _placement(device_map, max_memory, offload_folder)
    if ranks.active:
        import torch

        if "device_map" not in placement and torch.cuda.is_available():
            placement["device_map"] = {"": torch.cuda.current_device()}  # one device per rank (from_environment's)
        if "offload_folder" in placement:  # each rank offloads its own copy: never two writers on one file
            placement["offload_folder"] = os.path.join(placement["offload_folder"], f"rank{ranks.rank:03d}")
    tok_name = config.tokenizer if _is_path(config.tokenizer) else None
    data = config.dataset if _is_path(config.dataset) else None
    if not ranks.is_writer:  # calibrate its share; rank 0 evaluates and writes
        cfg, tok = _with_tokenizer(config, tok_name, source, shown, load_kwargs, False)
        qmodel, seconds, _, _ = _load_and_quantize(shown, cfg, source, load_kwargs, tok, None, eval_seqlen,
                                                   eval_windows, dtype, placement)
        return QuantizeResult(out=out, model=qmodel, config=cfg, seconds=seconds, perplexity={}, report={}, rows=[])
    tmp_out = output_dir.prepare(out, overwrite, {"MODEL": shown, "--tokenizer": tok_name, "--dataset": data,
                                                  "--eval-data": eval_data},
                                 folders={"--offload-folder": offload_folder, "--resume-dir": config.resume_dir})
    try:
        cfg, tok = _with_tokenizer(config, tok_name, source, shown, load_kwargs, eval_text is not None)
        qmodel, seconds, ppl, eval_ids = _load_and_quantize(shown, cfg, source, load_kwargs, tok, eval_text,
                                                            eval_seqlen, eval_windows, dtype, placement)
        qmodel.name_or_path = shown
        if eval_data:
            ppl["quantized"] = perplexity(qmodel, eval_ids, eval_seqlen, eval_windows)
            ppl["windows"] = min(eval_ids.numel() // eval_seqlen, eval_windows or 10**9)
        qmodel.astroquant_report = measurements_record(
            qmodel.astroquant_report, source=info, base_model=base_model, license=license,
            perplexity=ppl if eval_data else None, peak_memory=True)
        qmodel.save_pretrained(tmp_out)
        if tok is not None:
            tok.save_pretrained(tmp_out)
        write_card(tmp_out, model_id=out.name)  # again: the tokenizer is saved now; the final name, never a path
        output_dir.finish(tmp_out, out)
    except BaseException:
        output_dir.discard(tmp_out)
        raise
    report, rows = _quantize_summary(shown, cfg, qmodel, out, seconds, ppl if eval_data else None)
    return QuantizeResult(out=out, model=qmodel, config=cfg, seconds=seconds, perplexity=ppl, report=report,
                          rows=rows)


def _with_tokenizer(config, tok_name, source: str, shown: str, load_kwargs: dict, evaluating: bool):
    """(a copy of `config` holding the loaded tokenizer, the tokenizer): the caller's config is left as it was."""
    needed = config.needs_calibration_data or evaluating
    if config.tokenizer is None or tok_name is not None:
        tok = _tokenizer_of(os.fspath(tok_name or source), os.fspath(tok_name or shown), load_kwargs, needed)
    else:
        tok = config.tokenizer  # a loaded tokenizer
    options = {n: getattr(config, n) for n in config._option_names()}
    return type(config)(**{**options, "tokenizer": tok, "preset": config.preset}), tok


def _load_and_quantize(shown: str, cfg, source: str, load_kwargs: dict, tok, eval_text, eval_seqlen: int,
                       eval_windows: int | None, dtype: str, placement: dict):
    """(quantized model, seconds it took, perplexity record with the base model's, evaluation ids):
    a GGUF source is de-quantized once first; the base model is evaluated before it is quantized."""
    from transformers import AutoModelForCausalLM

    from ..eval import perplexity

    eval_ids = None
    base_src, base_kwargs = source, load_kwargs
    with tempfile.TemporaryDirectory() as fp_dir:
        if "gguf_file" in load_kwargs:  # de-quantize once; quantize from the plain checkpoint
            print(f"de-quantizing {shown} ...", file=sys.stderr)
            fp = _load_fp(source, load_kwargs, dtype, {})
            fp.save_pretrained(fp_dir)
            del fp
            base_src, base_kwargs = fp_dir, {}
        ppl: dict[str, Any] = {}
        if eval_text:
            text, what = eval_text
            eval_ids = tok(text, return_tensors="pt").input_ids[0]
            ppl = {"data": what, "seqlen": eval_seqlen}
            fp = _load_fp(base_src, base_kwargs, dtype, placement)
            ppl["base"] = perplexity(fp, eval_ids, eval_seqlen, eval_windows)
            del fp
        start = time.perf_counter()
        kwargs = dict(base_kwargs, dtype=_torch_dtype(dtype), quantization_config=cfg, **copy.deepcopy(placement))
        model = AutoModelForCausalLM.from_pretrained(base_src, **kwargs)
        seconds = time.perf_counter() - start
    return model, seconds, ppl, eval_ids


def _quantize_summary(shown: str, cfg, model, out: Path, seconds: float, ppl: dict | None):
    """(the saved report, the summary rows)."""
    from .. import full_precision
    from ..export.card import error_label, format_bytes, read_report

    report = read_report(out)
    errs = sorted(report.get("layer_errors", {}).values())
    rows = [("model", shown), ("output", str(out)),
            ("config", f"{cfg.bits}-bit g{cfg.group_size} {cfg.method}{' sym' if cfg.sym else ''}"
                       f"{' act-order' if cfg.desc_act else ''}{' mse' if cfg.mse else ''}"),
            ("layers quantized", len(model.config.quantization_config.quantized_modules or [])),
            ("quantization time (load + calibrate)", f"{seconds:.1f} s"),
            *([("ranks (torch.distributed)", report["world_size"])] if report.get("world_size", 1) > 1 else []),
            ("peak RSS", format_bytes(report["peak_rss_bytes"])),
            ("checkpoint size", format_bytes(sum(p.stat().st_size for p in out.glob("*.safetensors"))))]
    if report.get("quantized_fp16_bytes"):
        rows.append(("quantized layers, packed / fp16",
                     f"{report['quantized_packed_bytes'] / report['quantized_fp16_bytes']:.3f}"))
    if report.get("expert_tokens"):
        rows.append(("mixture of experts", full_precision.experts_summary(report)))
    if report.get("full_precision_weights"):
        rows.append(("weights left in full precision in the blocks",
                     full_precision.summary(report["full_precision_weights"])))
    if errs:
        rows.append((f"{error_label(report)} per layer, median / max", f"{errs[len(errs) // 2]:.2e} / {errs[-1]:.2e}"))
    rows.append(("base model (card)", report.get("base_model") or
                 "unknown: rerun with --base-model ORG/NAME (or edit README.md's base_model) to link it"))
    if ppl:
        rows.append((f"perplexity, full precision ({ppl['data']})", f"{ppl['base']:.2f}"))
        rows.append((f"perplexity, quantized ({ppl['data']})", f"{ppl['quantized']:.2f}"))
    return report, rows
