"""The shell entry point: `hf-astroquant` (or `python -m hf_astroquant`).

    hf-astroquant quantize MODEL --bits 4 --dataset FILE --out DIR   every AstroQuantConfig option
    hf-astroquant eval DIR [--data wikitext2|FILE] [--baseline MODEL] [--tasks ...]
    hf-astroquant export DIR --format gptq|compressed-tensors --out DIR2
    hf-astroquant export DIR --format gguf --out FILE.gguf [--gguf-type F16|F32]
    hf-astroquant push DIR REPO_ID [--private]

MODEL is a Hub id, a local model directory or a local .gguf file (de-quantized by transformers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .algorithms.gguf_types import FILE_TYPES
from .config import AstroQuantConfig
from . import output_dir
from .file_modes import snapshot, written_since
from .gguf import drop_gguf_marker, gguf_base_model_info
from .modules.kernels import BACKENDS

logger = logging.getLogger("hf_astroquant")
DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class ShellParser(argparse.ArgumentParser):
    """A parser whose errors are one line (which command, what is wrong, where help is), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """A shell type: an integer >= 1 (window sizes and counts: 0 would divide by zero or evaluate nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: a positive integer (>= 1)")
    return value


# --------------------------------------------------------------------------- config options as flags

def option_help(config_cls: type = AstroQuantConfig) -> dict[str, str]:
    """Each option's shell help, with its default as typed."""
    return {o.name: f"{o.help} (default: {o.shell_default()})".replace("%", "%%") for o in config_cls.OPTIONS}


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type = AstroQuantConfig) -> None:
    """A flag for every option of `config_cls` (typed, with choices and help, from its OPTIONS), and --preset."""
    from .presets import QUALITIES

    parser.add_argument("--preset", choices=QUALITIES, default=None,
                        help="start from a measured preset at --bits (2, 3 or 4): fast (the defaults, every model "
                             "family), balanced (adds a rotation) or best (the lowest perplexity we measured); other "
                             "flags override it (default: no preset)")
    helps = option_help(config_cls)
    group = parser.add_argument_group(f"quantization options ({config_cls.__name__})")
    for o in config_cls.OPTIONS:
        group.add_argument(o.flag, dest=o.name, default=None, help=helps[o.name], **o.argparse_kwargs())


def config_from_args(args: argparse.Namespace, config_cls: type = AstroQuantConfig, **extra) -> AstroQuantConfig:
    options = {n: getattr(args, n) for n in config_cls._option_names() if getattr(args, n, None) is not None}
    options.update(extra)
    if getattr(args, "preset", None):
        return config_cls.recommended(bits=options.pop("bits", 4), quality=args.preset, **options)
    return config_cls(**options)


# --------------------------------------------------------------------------- model sources

def resolve_source(model: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(path or id for from_pretrained, extra from_pretrained kwargs, base model info) for a Hub id, a
    local directory, or a local GGUF file."""
    from .export.hub import base_model_info

    path = Path(model)
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise CliError(f"GGUF file {model} does not exist")
        info = gguf_base_model_info(path)  # checks the header first: a hostile one is refused before any reader
        return str(path.parent), {"gguf_file": path.name}, info
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CliError(f"{model} is neither a model directory (with config.json) nor a .gguf file")
        return str(path), {}, base_model_info(model)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise CliError(f"{model!r} is not an existing path, a .gguf file or a Hub model id")
    from . import hub_access

    reason = hub_access.offline_unless_reachable()
    if reason:
        print(f"the Hugging Face Hub cannot be used ({reason}): {model} is read from the local cache only",
              file=sys.stderr)
    return model, {}, base_model_info(model)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _placement(args) -> dict:
    """from_pretrained's device_map / max_memory / offload_folder from the quantize flags."""
    kwargs: dict[str, Any] = {}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    if args.max_memory:
        budget: dict[Any, str] = {}
        for item in args.max_memory:
            device, sep, size = item.partition("=")
            if not sep or not device or not size:
                raise CliError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. cpu=8GiB or 0=20GiB")
            budget[int(device) if device.isdigit() else device] = size
        kwargs["max_memory"] = budget
        kwargs.setdefault("device_map", "auto")
    if args.offload_folder:
        if Path(args.offload_folder).exists() and not Path(args.offload_folder).is_dir():
            raise CliError(f"--offload-folder {args.offload_folder} exists and is not a directory")
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def _load_fp(source: str, load_kwargs: dict, dtype: str, placement: dict):
    from transformers import AutoModelForCausalLM

    kwargs = dict(load_kwargs, dtype=_torch_dtype(dtype), **placement)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return drop_gguf_marker(model) if "gguf_file" in load_kwargs else model


def _load_tokenizer(name: str, load_kwargs: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **{k: v for k, v in load_kwargs.items() if k == "gguf_file"})


def _tokenizer_of(name: str, shown: str, load_kwargs: dict, needed: bool):
    """The tokenizer `name` (shown to the user as `shown`); when it cannot be loaded, a one-line CliError if
    the run `needed` it (text calibration data, evaluation), else a note and None (saved without one)."""
    try:
        return _load_tokenizer(name, load_kwargs)
    except (OSError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
            reason = f"the directory has none of {', '.join(TOKENIZER_FILES)}"
        if needed:
            raise CliError(f"cannot load the tokenizer of {shown!r} ({reason}); pass --tokenizer NAME_OR_DIR") from err
        print(f"hf-astroquant: no tokenizer saved with the model: cannot load the tokenizer of {shown!r} ({reason})",
              file=sys.stderr)
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _apart_from(args, cfg) -> dict[str, dict[str, Any]]:
    """The local paths a quantize run reads, and the folders it fills: its --out keeps apart from both."""
    data = cfg.dataset if isinstance(cfg.dataset, (str, os.PathLike)) else None
    return {"inputs": {"MODEL": args.model, "--tokenizer": args.tokenizer, "--dataset": data,
                       "--eval-data": args.eval_data},
            "folders": {"--offload-folder": args.offload_folder, "--resume-dir": cfg.resume_dir}}


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 2 + max(len(str(v)) for _, v in rows)))
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


# --------------------------------------------------------------------------- commands

def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from .calibration import check_source
    from .eval import evaluation_text, perplexity
    from .export.card import write_card

    out = Path(args.out)
    # every argument, the data included, is checked before anything is loaded
    cfg = config_from_args(args)
    source, load_kwargs, info = resolve_source(args.model)
    if cfg.needs_calibration_data and cfg.dataset is None:
        raise CliError(f"--method {cfg.method} needs calibration data: pass --dataset FILE|wikitext2|c4")
    check_source(cfg.dataset)
    eval_text = evaluation_text(args.eval_data) if args.eval_data else None
    _placement(args)  # its flags are checked here too, not after a first load
    tmp_out = output_dir.prepare(out, args.overwrite, **_apart_from(args, cfg))
    try:
        needed = cfg.needs_calibration_data or eval_text is not None
        tok = _tokenizer_of(args.tokenizer or source, args.tokenizer or args.model, load_kwargs, needed)
        cfg = config_from_args(args, tokenizer=tok)
        model, seconds, ppl, eval_ids = _load_and_quantize(args, cfg, source, load_kwargs, tok, eval_text)
        model.name_or_path = args.model
        report = dict(model.astroquant_report or {})
        report.update({k: v for k, v in info.items() if v is not None})
        for key, value in (("base_model", args.base_model), ("license", args.license)):
            if value:
                report[key] = value
        if args.eval_data:
            ppl["quantized"] = perplexity(model, eval_ids, args.eval_seqlen, args.eval_windows)
            ppl["windows"] = min(eval_ids.numel() // args.eval_seqlen, args.eval_windows or 10**9)
            report["perplexity"] = ppl
        report["peak_rss_bytes"] = _peak_rss_bytes()
        if torch.cuda.is_available():
            report["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        model.astroquant_report = report
        model.save_pretrained(tmp_out)
        if tok is not None:
            tok.save_pretrained(tmp_out)
        write_card(tmp_out, model_id=out.name)  # again: the tokenizer is saved now; the final name, never a path
        output_dir.finish(tmp_out, out)
    except BaseException:
        output_dir.discard(tmp_out)
        raise
    print_table("hf-astroquant quantize: summary", _quantize_summary(args, cfg, model, out, seconds, ppl))
    return 0


def _load_and_quantize(args, cfg, source: str, load_kwargs: dict, tok, eval_text):
    """(quantized model, seconds it took, perplexity record with the base model's, evaluation ids):
    a GGUF source is de-quantized once first; the base model is evaluated before it is quantized."""
    from transformers import AutoModelForCausalLM

    from .eval import perplexity

    eval_ids = None
    base_src, base_kwargs = source, load_kwargs
    with tempfile.TemporaryDirectory() as fp_dir:
        if "gguf_file" in load_kwargs:  # de-quantize once; quantize from the plain checkpoint
            print(f"de-quantizing {args.model} ...", file=sys.stderr)
            fp = _load_fp(source, load_kwargs, args.dtype, {})
            fp.save_pretrained(fp_dir)
            del fp
            base_src, base_kwargs = fp_dir, {}
        ppl: dict[str, Any] = {}
        if eval_text:
            text, what = eval_text
            eval_ids = tok(text, return_tensors="pt").input_ids[0]
            ppl = {"data": what, "seqlen": args.eval_seqlen}
            fp = _load_fp(base_src, base_kwargs, args.dtype, _placement(args))
            ppl["base"] = perplexity(fp, eval_ids, args.eval_seqlen, args.eval_windows)
            del fp
        start = time.perf_counter()
        kwargs = dict(base_kwargs, dtype=_torch_dtype(args.dtype), quantization_config=cfg, **_placement(args))
        model = AutoModelForCausalLM.from_pretrained(base_src, **kwargs)
        seconds = time.perf_counter() - start
    return model, seconds, ppl, eval_ids


def _quantize_summary(args, cfg, model, out: Path, seconds: float, ppl: dict) -> list[tuple[str, Any]]:
    from . import coverage
    from .export.card import error_label, format_bytes, read_report

    report = read_report(out)
    errs = sorted(report.get("layer_errors", {}).values())
    rows = [("model", args.model), ("output", str(out)),
            ("config", f"{cfg.bits}-bit g{cfg.group_size} {cfg.method}{' sym' if cfg.sym else ''}"
                       f"{' act-order' if cfg.desc_act else ''}{' mse' if cfg.mse else ''}"),
            ("layers quantized", len(model.config.quantization_config.quantized_modules or [])),
            ("quantization time (load + calibrate)", f"{seconds:.1f} s"),
            ("peak RSS", format_bytes(report["peak_rss_bytes"])),
            ("checkpoint size", format_bytes(sum(p.stat().st_size for p in out.glob("*.safetensors"))))]
    if report.get("quantized_fp16_bytes"):
        rows.append(("quantized layers, packed / fp16", f"{report['quantized_packed_bytes'] / report['quantized_fp16_bytes']:.3f}"))
    if report.get("expert_tokens"):
        rows.append(("mixture of experts", coverage.experts_summary(report)))
    if report.get("full_precision_weights"):
        rows.append(("weights left in full precision in the blocks", coverage.summary(report["full_precision_weights"])))
    if errs:
        rows.append((f"{error_label(report)} per layer, median / max", f"{errs[len(errs) // 2]:.2e} / {errs[-1]:.2e}"))
    rows.append(("base model (card)", report.get("base_model") or
                 "unknown: rerun with --base-model ORG/NAME (or edit README.md's base_model) to link it"))
    if args.eval_data:
        rows.append((f"perplexity, full precision ({ppl['data']})", f"{ppl['base']:.2f}"))
        rows.append((f"perplexity, quantized ({ppl['data']})", f"{ppl['quantized']:.2f}"))
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from .eval import evaluation_text, lm_eval_scores, perplexity
    from .export.card import is_ours, read_report, write_card, write_report

    directory = Path(args.dir)
    if not (directory / "config.json").is_file():
        raise CliError(f"{directory} is not a saved model directory (no config.json)")
    if not args.data and not args.tasks:
        raise CliError("nothing to evaluate: pass --data (default wikitext2) or --tasks")
    load = {}
    if args.backend:
        load["quantization_config"] = AstroQuantConfig(backend=args.backend)
    tok = _tokenizer_of(args.tokenizer or str(directory), args.tokenizer or str(directory), {}, needed=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), **load)
    report = read_report(directory)
    rows: list[tuple[str, Any]] = [("model", str(directory))]
    if args.data:
        text, what = evaluation_text(args.data)
        ids = tok(text, return_tensors="pt").input_ids[0]
        ppl = dict(report.get("perplexity") or {})
        if ppl.get("data") != what or ppl.get("seqlen") != args.seqlen:
            ppl = {}  # a perplexity on other text or windows is not comparable: start over
        ppl.update({"data": what, "seqlen": args.seqlen,
                    "windows": min(ids.numel() // args.seqlen, args.max_windows or 10**9)})
        ppl["quantized"] = perplexity(model, ids, args.seqlen, args.max_windows)
        rows.append((f"perplexity ({what}, seqlen {args.seqlen})", f"{ppl['quantized']:.2f}"))
        if args.baseline:
            source, load_kwargs, _ = resolve_source(args.baseline)
            base = _load_fp(source, load_kwargs, args.dtype, {})
            ppl["base"] = perplexity(base, ids, args.seqlen, args.max_windows)
            rows.append((f"perplexity, baseline {args.baseline}", f"{ppl['base']:.2f}"))
            del base
        report["perplexity"] = ppl
    if args.tasks:
        scores = lm_eval_scores(model, tok, args.tasks.split(","), args.limit, args.batch_size)
        report["lm_eval"] = scores
        rows += [(f"lm-eval {k}", f"{v:.4f}") for k, v in sorted(scores.items())]
    if args.write:
        before = snapshot(directory)
        write_report(directory, report)
        if is_ours(directory / "README.md"):
            write_card(directory)
        output_dir.record_written(directory, written_since(directory, before))
    print_table("hf-astroquant eval", rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.card import REPORT_FILE, format_bytes, write_card
    from .export.source import ExportError

    src, out = Path(args.dir), Path(args.out)
    if args.format == "gguf":
        return _export_gguf(src, out, args)
    if args.gguf_type is not None:
        raise CliError(f"--gguf-type is a GGUF option; use it with --format gguf, not --format {args.format}")
    if args.format != "gptq" and args.checkpoint_format is not None:
        raise CliError(f"--checkpoint-format is a GPTQ option; --format {args.format} has none")
    tmp_out = output_dir.prepare(out, args.overwrite, {"DIR": src})
    try:
        rows = _EXPORTERS[args.format](src, tmp_out, args)
        if (src / REPORT_FILE).is_file():
            shutil.copy2(src / REPORT_FILE, tmp_out / REPORT_FILE)
        write_card(tmp_out, model_id=out.name)  # a name, never a path of this machine
        output_dir.finish(tmp_out, out)
    except ExportError as err:
        output_dir.discard(tmp_out)
        raise CliError(f"cannot export to {_FORMAT_NAMES[args.format]}: {err}") from err
    except BaseException:
        output_dir.discard(tmp_out)
        raise
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print_table("hf-astroquant export", [("source", str(src)), ("output", str(out))] + rows
                + [("size", format_bytes(size))])
    return 0


def _export_gguf(src: Path, out: Path, args: argparse.Namespace) -> int:
    """One .gguf file (not a directory): llama.cpp, Ollama and LM Studio read it as is."""
    from .export.card import format_bytes
    from .export.gguf_export import export_gguf
    from .export.gguf_writer import GGUFWriteError
    from .export.source import ExportError

    if args.checkpoint_format is not None:
        raise CliError("--checkpoint-format is a GPTQ option; --format gguf has none")
    try:
        summary = export_gguf(src, out, args.gguf_type, overwrite=args.overwrite)
    except FileExistsError as err:
        raise CliError(f"{err}".replace("overwrite=True (--overwrite)", "--overwrite")) from err
    except (ExportError, GGUFWriteError) as err:
        raise CliError(f"cannot export to GGUF: {err}") from err
    types = ", ".join(f"{k} {v}" for k, v in sorted(summary["tensor_types"].items()))
    print_table("hf-astroquant export", [
        ("source", str(src)), ("output", str(out)), ("format", f"gguf ({summary['gguf_type']})"),
        ("architecture", summary["arch"]), ("tokenizer", f"{summary['tokenizer']} ({summary['tokenizer_pre']})"),
        ("tensors", f"{summary['tensors']}: {types}"), ("size", format_bytes(summary["bytes"])),
        ("run it", f"llama-cli -m {out}  (or: ollama create NAME with FROM {out} in a Modelfile)")])
    return 0


def _export_gptq(src: Path, out: Path, args: argparse.Namespace) -> list[tuple[str, object]]:
    from .export.engines import vllm_notes
    from .export.gptq import export_gptq

    summary = export_gptq(src, out, checkpoint_format=args.checkpoint_format or "gptq",
                          dtype=_torch_dtype(args.dtype), overwrite=True)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    notes = vllm_notes("gptq", q["bits"], q["sym"], summary.desc_act)
    return [("format", f"gptq ({summary.checkpoint_format})"), ("desc_act", summary.desc_act),
            ("quantized layers", summary.layers)] + [("vLLM", note) for note in notes]


def _export_compressed_tensors(src: Path, out: Path, args: argparse.Namespace) -> list[tuple[str, object]]:
    from .export.compressed_tensors import export_compressed_tensors
    from .export.engines import vllm_notes

    summary = export_compressed_tensors(src, out, dtype=_torch_dtype(args.dtype), overwrite=True)
    rows = [("format", "compressed-tensors (pack-quantized)"), ("actorder", summary.actorder or "none"),
            ("quantized layers", summary.layers), ("left in full precision", ", ".join(summary.ignored) or "none")]
    if summary.largest_scale_rounding:
        rows.append(("scales rounded to " + args.dtype, f"by at most {summary.largest_scale_rounding:.2%} (relative)"))
    w = summary.weights
    return rows + [("vLLM", note) for note in vllm_notes("compressed-tensors", w["num_bits"], w["symmetric"],
                                                        summary.actorder == "group")]


_EXPORTERS = {"gptq": _export_gptq, "compressed-tensors": _export_compressed_tensors}
_FORMAT_NAMES = {"gptq": "GPTQ", "compressed-tensors": "compressed-tensors"}


def cmd_push(args: argparse.Namespace) -> int:
    from .export.hub import push_folder

    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} is not a saved model directory (no config.json)")
    info = push_folder(folder, args.repo_id, private=args.private, token=args.token,
                       commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    print_table("hf-astroquant push", [("folder", str(folder)), ("repository", args.repo_id),
                                       ("commit", getattr(info, "commit_url", info))])
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = ShellParser(prog="hf-astroquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-astroquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,export,push}")

    _add_quantize(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_push(sub)
    return parser


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model and save it", description="Quantize MODEL (a Hub id, "
                       "a local directory or a .gguf file) and save the packed checkpoint, its card and report.")
    q.add_argument("model", metavar="MODEL", help="what to quantize: a Hub id (org/name), a local model directory "
                   "(with config.json) or a local .gguf file")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="output directory; it appears only when complete (a crash leaves no half-written DIR)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-astroquant output at --out (never a folder it did not write, nor one "
                        "holding files added since)")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded and calibrated in (default: float32)")
    q.add_argument("--device-map", default=None, metavar="MAP",
                   help="transformers device_map, e.g. auto, cpu, cuda:0 (default: the model's own placement)")
    q.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE",
                   help="memory caps for device_map='auto' (implied), e.g. cpu=8GiB 0=20GiB; what does not fit is "
                        "offloaded to --offload-folder and calibrated one block at a time")
    q.add_argument("--offload-folder", metavar="DIR", help="where accelerate offloads weights to disk")
    q.add_argument("--eval-data", default=None, metavar="{wikitext2-raw,wikitext2,FILE}",
                   help="also measure perplexity before and after on this text: wikitext2-raw (WikiText-2 test, "
                        "shipped: works offline), wikitext2 (the same split from the Hub) or a local text file "
                        "(default: no evaluation)")
    q.add_argument("--eval-seqlen", type=positive_int, default=2048, metavar="N",
                   help="tokens per perplexity window (default: 2048)")
    q.add_argument("--eval-windows", type=positive_int, default=None, metavar="N",
                   help="evaluate at most this many windows (default: all)")
    q.add_argument("--base-model", default=None, metavar="ORG/NAME",
                   help="Hub id of the model MODEL was made from, for the card's base_model (default: found from "
                        "MODEL when it can be)")
    q.add_argument("--license", default=None, help="licence for the card (default: the base model's, when known)")
    add_config_flags(q)
    q.set_defaults(func=cmd_quantize)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and lm-eval tasks of a saved model")
    e.add_argument("dir", metavar="DIR", help="a directory saved by hf-astroquant quantize (or save_pretrained)")
    e.add_argument("--data", default="wikitext2", metavar="{wikitext2,wikitext2-raw,FILE}",
                   help="text for perplexity: wikitext2 (WikiText-2 test from the Hub), wikitext2-raw (the same "
                        "split's raw file, shipped: works offline), a local text file, or '' to skip "
                        "(default: wikitext2)")
    e.add_argument("--seqlen", type=positive_int, default=2048, metavar="N", help="tokens per window (default: 2048)")
    e.add_argument("--max-windows", type=positive_int, default=None, metavar="N",
                   help="evaluate at most this many windows (default: all)")
    e.add_argument("--baseline", default=None, metavar="MODEL",
                   help="also evaluate this full-precision model (Hub id, directory or .gguf file)")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the baseline model (default: float32)")
    e.add_argument("--tokenizer", default=None, metavar="NAME_OR_DIR", help="tokenizer (default: DIR's own)")
    e.add_argument("--backend", choices=BACKENDS, default=None,
                   help="forward path of the packed layers (default: auto, the fastest that runs each layer)")
    e.add_argument("--tasks", default=None, metavar="TASK,TASK",
                   help="comma-separated lm-eval tasks (needs pip install lm-eval)")
    e.add_argument("--limit", type=positive_int, default=None, metavar="N", help="lm-eval: examples per task (default: all)")
    e.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="lm-eval batch size (default: 1)")
    e.add_argument("--no-write", dest="write", action="store_false",
                   help="do not record the results in DIR's report and card")
    e.set_defaults(func=cmd_eval)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write a copy in a serving engine's format")
    x.add_argument("dir", metavar="DIR", help="a directory saved by hf-astroquant quantize")
    x.add_argument("--format", choices=("gptq", "compressed-tensors", "gguf"), required=True,
                   help="the engine format to write: gptq (vLLM, SGLang, TGI, transformers, GPTQModel; symmetric "
                        "grids for vLLM), compressed-tensors (vLLM and transformers, asymmetric grids included) or "
                        "gguf (llama.cpp, Ollama, LM Studio: a checkpoint quantized with --gguf-type, or a "
                        "full-precision model as F16/F32)")
    x.add_argument("--out", required=True, metavar="DIR2",
                   help="output directory, or the .gguf file for --format gguf (appears only when complete)")
    x.add_argument("--gguf-type", choices=("F16", "F32") + tuple(FILE_TYPES), default=None, metavar="TYPE",
                   help="--format gguf: for a full-precision DIR, F16 (default) or F32; a DIR quantized with "
                        "--gguf-type is written in the type it was solved for (naming it is optional)")
    x.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default=None,
                   help="--format gptq only. gptq: v1, read by vLLM/SGLang/TGI/transformers; gptq_v2: GPTQModel "
                        "(default: gptq)")
    x.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="dtype of the unquantized tensors; gptq writes float16 scales always, compressed-tensors "
                        "writes scales in this dtype (float16 holds ours exactly) (default: float16)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-astroquant output at DIR2 (never a folder or .gguf file it did not write)")
    x.set_defaults(func=cmd_export)


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a saved directory to the Hub (with its card)")
    p.add_argument("dir", metavar="DIR", help="the directory to upload")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repository, org/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="Hub token (default: the one huggingface-cli login saved, or HF_TOKEN)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="branch to commit to (default: main)")
    p.add_argument("--commit-message", default=None, metavar="TEXT", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(func=cmd_push)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (CliError, ValueError, TypeError, OSError, ImportError) as err:  # OSError: files, the Hub
        if args.verbose:
            raise
        print(f"hf-astroquant {args.command}: error: {err}\n(run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
