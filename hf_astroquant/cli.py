"""The shell entry point: `hf-astroquant` (or `python -m hf_astroquant`).

    hf-astroquant quantize MODEL --bits 4 --dataset FILE --out DIR   every AstroQuantConfig option
    hf-astroquant eval DIR [--data wikitext2|FILE] [--baseline MODEL] [--tasks ...]
    hf-astroquant export DIR --format FORMAT --out OUT   every registered format (export/registry.py):
                                                         gptq, compressed-tensors, gguf (OUT a .gguf file)
    hf-astroquant push DIR REPO_ID [--private]

MODEL is a Hub id, a local model directory or a local .gguf file (de-quantized by transformers).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .config import AstroQuantConfig
from .modules.kernels import BACKENDS
from .workflows.sources import DTYPES

logger = logging.getLogger("hf_astroquant")


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
                        help="start from a measured preset at --bits (2, 3 or 4; with --gguf-type, the type's main width by default): fast (the defaults, every model "
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
        from .presets import gguf_preset_bits

        default = gguf_preset_bits(options["gguf_type"]) if options.get("gguf_type") else 4
        return config_cls.recommended(bits=options.pop("bits", default), quality=args.preset, **options)
    return config_cls(**options)


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 2 + max(len(str(v)) for _, v in rows)))
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


# --------------------------------------------------------------------------- commands

# quantize, eval, export and push are the workflows of hf_astroquant.workflows (callable from Python): the
# commands turn flags into arguments and print the rows they return.

def cmd_quantize(args: argparse.Namespace) -> int:
    from .workflows import quantize

    cfg = config_from_args(args)  # the options first; the workflow checks the rest before loading anything
    result = quantize(args.model, args.out, cfg, eval_data=args.eval_data, eval_seqlen=args.eval_seqlen,
                      eval_windows=args.eval_windows, dtype=args.dtype, device_map=args.device_map,
                      max_memory=args.max_memory, offload_folder=args.offload_folder, base_model=args.base_model,
                      license=args.license, overwrite=args.overwrite)
    if result.rows:  # (under torchrun only rank 0 writes and reports)
        print_table("hf-astroquant quantize: summary", result.rows)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .workflows import evaluate

    result = evaluate(args.dir, data=args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                      baseline=args.baseline, dtype=args.dtype, tokenizer=args.tokenizer, backend=args.backend,
                      tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, write=args.write)
    print_table("hf-astroquant eval", result.rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Every format the same way (workflows.export over export/registry.py)."""
    from .export.registry import get_exporter
    from .workflows import export

    exporter = get_exporter(args.format)
    try:
        summary = export(args.dir, args.out, args.format, overwrite=args.overwrite, **_export_options(exporter, args))
    except FileExistsError as err:
        raise CliError(f"{err}".replace("overwrite=True (--overwrite)", "--overwrite")) from err
    print_table("hf-astroquant export", [("source", str(args.dir)), ("output", str(args.out))] + summary.rows)
    return 0


def _export_options(exporter, args: argparse.Namespace) -> dict[str, Any]:
    """The chosen format's option values from the flags; another format's flag, given, is refused."""
    from .export.registry import export_options

    own = {o.dest for o in exporter.options}
    for option, owners in export_options():
        if option.dest not in own and option.default is None and getattr(args, option.dest) is not None:
            names, formats = " and ".join(e.display_name for e in owners), " or ".join(e.name for e in owners)
            raise CliError(f"{option.flag} is a {names} option; --format {exporter.name} has none: use it with "
                           f"--format {formats}")
    return {o.dest: getattr(args, o.dest) for o in exporter.options}


def cmd_push(args: argparse.Namespace) -> int:
    from .workflows import push

    result = push(args.dir, args.repo_id, private=args.private, token=args.token,
                  commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    print_table("hf-astroquant push", result.rows)
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
    """`export`'s --format choices and each format's flags come from the registry (export/registry.py)."""
    from .export.registry import export_options, exporters

    formats = exporters()
    described = [f"{name} ({e.engines})" if e.engines else name for name, e in formats.items()]
    files = [e for e in formats.values() if e.file_suffix]  # the formats whose --out is one file
    x = sub.add_parser("export", help="write a copy in a serving engine's format")
    x.add_argument("dir", metavar="DIR", help="a directory saved by hf-astroquant quantize")
    x.add_argument("--format", choices=tuple(formats), required=True,
                   help="the engine format to write: " + " or ".join(filter(None, [", ".join(described[:-1]),
                                                                                   described[-1]])))
    x.add_argument("--out", required=True, metavar="DIR2",
                   help="output directory" + "".join(f", or the {e.file_suffix} file for --format {e.name}"
                                                     for e in files) + " (appears only when complete)")
    for option, _ in export_options():
        x.add_argument(option.flag, **option.argparse_kwargs())
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-astroquant output at DIR2 (never a folder"
                        + "".join(f" or {e.file_suffix} file" for e in files) + " it did not write)")
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
