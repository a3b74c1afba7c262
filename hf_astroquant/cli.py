"""The shell entry point: `hf-astroquant` (or `python -m hf_astroquant`).

    hf-astroquant quantize MODEL --bits 4 --dataset FILE --out DIR   every AstroQuantConfig option
    hf-astroquant eval DIR [--data wikitext2|FILE] [--baseline MODEL] [--tasks ...]
    hf-astroquant export DIR --format gptq --out DIR2
    hf-astroquant push DIR REPO_ID [--private]

MODEL is a Hub id, a local model directory or a local .gguf file (de-quantized by transformers).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ASYM_ALPHA_CHOICES, SUPPORTED_BITS, SUPPORTED_METHODS, SUPPORTED_ROUNDING, SUPPORTED_TRANSFORMS, AstroQuantConfig
from .gguf import drop_gguf_marker, gguf_license
from .modules.kernels import BACKENDS

logger = logging.getLogger("hf_astroquant")
DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- config options as flags

def _asym_alpha(text: str):
    if text in ASYM_ALPHA_CHOICES:
        return text
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1], 'auto', 'projected' or 'none'")


def _optional_int(text: str):
    return None if text.lower() in ("none", "auto", "all") else int(text)


_OPTION_ARGS: dict[str, dict[str, Any]] = {
    "bits": dict(type=int, choices=SUPPORTED_BITS),
    "group_size": dict(type=int),
    "sym": dict(action=argparse.BooleanOptionalAction),
    "desc_act": dict(action=argparse.BooleanOptionalAction),
    "static_groups": dict(action=argparse.BooleanOptionalAction),
    "damp_percent": dict(type=float),
    "true_sequential": dict(action=argparse.BooleanOptionalAction),
    "method": dict(choices=SUPPORTED_METHODS),
    "mse": dict(action=argparse.BooleanOptionalAction),
    "alpha": dict(type=float),
    "asym_alpha": dict(type=_asym_alpha, metavar="{FLOAT,auto,projected,none}"),
    "rounding": dict(choices=SUPPORTED_ROUNDING),
    "beam_width": dict(type=int),
    "fp_samples": dict(type=_optional_int, metavar="{INT,all}"),
    "dataset": dict(metavar="NAME_OR_FILE"),
    "tokenizer": dict(metavar="NAME_OR_DIR"),
    "n_samples": dict(type=int),
    "seqlen": dict(type=int),
    "seed": dict(type=int),
    "modules_to_not_convert": dict(nargs="+", metavar="PATTERN"),
    "block_size": dict(type=int),
    "calibration_batch_size": dict(type=_optional_int, metavar="{INT,auto}"),
    "backend": dict(choices=BACKENDS),
    "resume_dir": dict(metavar="DIR"),
    "solve_devices": dict(nargs="+", metavar="DEVICE"),
    "astro": dict(action=argparse.BooleanOptionalAction),
    "astro_beta": dict(type=float),
    "astro_steps": dict(type=int),
    "astro_lr": dict(type=float),
    "transform": dict(choices=SUPPORTED_TRANSFORMS),
    "kurtosis_threshold_attn": dict(type=float),
    "kurtosis_threshold_mlp": dict(type=float),
}


def option_help() -> dict[str, str]:
    """Each option's description, read from AstroQuantConfig's docstring (one source of truth)."""
    doc = inspect.getdoc(AstroQuantConfig) or ""
    helps: dict[str, list[str]] = {}
    current = None
    for line in doc.split("Args:", 1)[-1].splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = [m.group(2)]
        elif current and line.startswith("        "):
            helps[current].append(line.strip())
    return {k: " ".join(v).replace("%", "%%") for k, v in helps.items()}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization options (AstroQuantConfig; unset flags keep its defaults)")
    helps = option_help()
    for name in AstroQuantConfig._option_names():
        kwargs = dict(_OPTION_ARGS[name])  # KeyError here means a new option lacks its flag (tested)
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=helps.get(name), **kwargs)


def config_from_args(args: argparse.Namespace, **extra) -> AstroQuantConfig:
    options = {n: getattr(args, n) for n in AstroQuantConfig._option_names() if getattr(args, n, None) is not None}
    options.update(extra)
    return AstroQuantConfig(**options)


# --------------------------------------------------------------------------- model sources

def resolve_source(model: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(path or id for from_pretrained, extra from_pretrained kwargs, base model info) for a Hub id, a
    local directory, or a local GGUF file."""
    from .export.hub import base_model_info

    path = Path(model)
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise CliError(f"GGUF file {model} does not exist")
        info = {"source": path.name, "base_model": None, "license": gguf_license(path)}
        return str(path.parent), {"gguf_file": path.name}, info
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise CliError(f"{model} is neither a model directory (with config.json) nor a .gguf file")
        return str(path), {}, base_model_info(model)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise CliError(f"{model!r} is not an existing path, a .gguf file or a Hub model id")
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


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `out` to write into (renamed into place when complete, so an
    interrupted run never leaves a half-written `out`)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CliError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _finish_out(tmp: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 2 + max(len(str(v)) for _, v in rows)))
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


# --------------------------------------------------------------------------- commands

def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from .eval import evaluation_text, perplexity
    from .export.card import format_bytes, read_report, write_card

    out = Path(args.out)
    source, load_kwargs, info = resolve_source(args.model)
    try:
        tok = _load_tokenizer(args.tokenizer or source, load_kwargs)
    except OSError as err:
        raise CliError(f"cannot load the tokenizer of {args.tokenizer or args.model!r}: {err}") from err
    cfg = config_from_args(args, tokenizer=tok)
    if cfg.needs_calibration_data and cfg.dataset is None:
        raise CliError(f"--method {cfg.method} needs calibration data: pass --dataset wikitext2|c4|FILE")
    tmp_out = _prepare_out(out, args.overwrite)
    try:
        base_src, base_kwargs = source, load_kwargs
        with tempfile.TemporaryDirectory() as fp_dir:
            if "gguf_file" in load_kwargs:  # de-quantize once; quantize from the plain checkpoint
                print(f"de-quantizing {args.model} ...", file=sys.stderr)
                fp = _load_fp(source, load_kwargs, args.dtype, {})
                fp.save_pretrained(fp_dir)
                del fp
                base_src, base_kwargs = fp_dir, {}
            ppl: dict[str, Any] = {}
            if args.eval_data:
                text, what = evaluation_text(args.eval_data)
                eval_ids = tok(text, return_tensors="pt").input_ids[0]
                ppl = {"data": what, "seqlen": args.eval_seqlen}
                fp = _load_fp(base_src, base_kwargs, args.dtype, _placement(args))
                ppl["base"] = perplexity(fp, eval_ids, args.eval_seqlen, args.eval_windows)
                del fp
            start = time.perf_counter()
            from transformers import AutoModelForCausalLM

            kwargs = dict(base_kwargs, dtype=_torch_dtype(args.dtype), quantization_config=cfg, **_placement(args))
            model = AutoModelForCausalLM.from_pretrained(base_src, **kwargs)
            seconds = time.perf_counter() - start
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
        tok.save_pretrained(tmp_out)
        write_card(tmp_out, model_id=str(out))  # again: the tokenizer is saved now, and the final name
        _finish_out(tmp_out, out)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
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
    if errs:
        rows.append(("relative layer error, median / max", f"{errs[len(errs) // 2]:.2e} / {errs[-1]:.2e}"))
    if args.eval_data:
        rows.append((f"perplexity, full precision ({ppl['data']})", f"{ppl['base']:.2f}"))
        rows.append((f"perplexity, quantized ({ppl['data']})", f"{ppl['quantized']:.2f}"))
    print_table("hf-astroquant quantize: summary", rows)
    return 0


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
    model = AutoModelForCausalLM.from_pretrained(str(directory), **load)
    tok = _load_tokenizer(args.tokenizer or str(directory), {})
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
        write_report(directory, report)
        if is_ours(directory / "README.md"):
            write_card(directory)
    print_table("hf-astroquant eval", rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.card import REPORT_FILE, format_bytes, write_card
    from .export.gptq import ExportError, export_gptq

    src, out = Path(args.dir), Path(args.out)
    tmp_out = _prepare_out(out, args.overwrite)
    try:
        summary = export_gptq(src, tmp_out, checkpoint_format=args.checkpoint_format,
                              dtype=_torch_dtype(args.dtype), overwrite=True)
        if (src / REPORT_FILE).is_file():
            shutil.copy2(src / REPORT_FILE, tmp_out / REPORT_FILE)
        write_card(tmp_out, model_id=str(out))
        _finish_out(tmp_out, out)
    except ExportError as err:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise CliError(f"cannot export to GPTQ: {err}") from err
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    print_table("hf-astroquant export", [
        ("source", str(src)), ("output", str(out)), ("format", f"gptq ({summary.checkpoint_format})"),
        ("desc_act", summary.desc_act), ("quantized layers", summary.layers),
        ("size", format_bytes(summary.bytes_written))])
    return 0


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

    parser = argparse.ArgumentParser(prog="hf-astroquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-astroquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,export,push}")

    q = sub.add_parser("quantize", help="quantize a model and save it", description="Quantize MODEL (a Hub id, "
                       "a local directory or a .gguf file) and save the packed checkpoint, its card and report.")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded and calibrated in")
    q.add_argument("--device-map", default=None, help="transformers device_map, e.g. auto, cpu, cuda:0")
    q.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE",
                   help="memory caps for device_map='auto' (implied), e.g. cpu=8GiB 0=20GiB; what does not fit is "
                        "offloaded to --offload-folder and calibrated one block at a time")
    q.add_argument("--offload-folder", metavar="DIR", help="where accelerate offloads weights to disk")
    q.add_argument("--eval-data", default=None, metavar="wikitext2|FILE",
                   help="also measure perplexity before and after on this text")
    q.add_argument("--eval-seqlen", type=int, default=2048)
    q.add_argument("--eval-windows", type=int, default=None, help="evaluate at most this many windows")
    q.add_argument("--base-model", default=None, help="Hub id of the base model, for the card's metadata")
    q.add_argument("--license", default=None, help="licence for the card (default: the base model's, when known)")
    add_config_flags(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and lm-eval tasks of a saved model")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--data", default="wikitext2", metavar="wikitext2|FILE",
                   help="text for perplexity ('' to skip); wikitext2 needs the Hub (datasets)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--baseline", default=None, metavar="MODEL", help="also evaluate this full-precision model")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the baseline model")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--backend", choices=BACKENDS, default=None, help="forward path of the packed layers")
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs pip install lm-eval)")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    e.add_argument("--no-write", dest="write", action="store_false",
                   help="do not record the results in DIR's report and card")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a copy in a serving engine's format")
    x.add_argument("dir", metavar="DIR")
    x.add_argument("--format", choices=("gptq",), required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="gptq: v1, read by vLLM/SGLang/TGI/transformers; gptq_v2: GPTQModel")
    x.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="dtype of the unquantized tensors (scales are always float16)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a saved directory to the Hub (with its card)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true")
    p.set_defaults(func=cmd_push)
    return parser


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
