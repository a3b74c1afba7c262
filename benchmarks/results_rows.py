"""The one schema of benchmarks/results/rows.jsonl, the rows every table of README.md and docs/ is
rendered from (`update_readme.py`). One JSON object per line:

    {"table": "peers",                 the table it belongs to (a table spec of update_readme.py)
     "label": "gptq-w4 seed=1",        its identity in the table: what was run, as its command names it
     "columns": {"ppl": 21.5, ...},    what was measured and the settings that produced it
     "command": "python benchmarks/bench_quality.py --rows gptq-w4 --set seed=1 --table peers",
     "sitting": "peers",               the sitting (a name, or the date it ran)
     "machine": "AMD EPYC, 2 threads"}

A row written with the table and label of a row already there replaces it in place (a rerun updates
the table); `merge=True` updates only the columns it names (a later measurement of part of a row).
Rows whose columns hold a "note" are the paragraphs under their table. Earlier per-sitting files
are kept, untouched, in results/archive/.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS_FILE = REPO / "benchmarks" / "results" / "rows.jsonl"


def machine() -> str:
    """The CPU model and torch's thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return f"{cpu}, {torch.get_num_threads()} threads"


def command(args: list[str] | None = None, env: tuple[str, ...] = ()) -> str:
    """This process's command line (or `args`, a script and its arguments) as run from the repository
    root, by the Python that runs it and with the variables of `env` that are set."""
    where = lambda p: p if os.path.relpath(p, REPO).startswith("..") else os.path.relpath(p, REPO)  # noqa: E731
    python = where(sys.executable) if where(sys.executable) != sys.executable else "python"
    args = sys.argv if args is None else args
    return shlex.join([f"{k}={where(os.environ[k])}" for k in env if k in os.environ]
                      + [python, where(os.path.abspath(args[0])), *args[1:]])


this_command, this_machine = command, machine


def row(table: str, label: str, columns: dict, *, command: str | None = None, sitting: str | None = None,
        machine: str | None = None) -> dict:
    """A row of the schema; the command defaults to this process's, the sitting to today's date."""
    return {"table": table, "label": label, "columns": columns, "command": command or this_command(),
            "sitting": sitting or datetime.date.today().isoformat(), "machine": machine or this_machine()}


def read_rows(path: Path | None = None) -> list[dict]:
    path = path or ROWS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_rows(rows: list[dict], path: Path | None = None, merge: bool = False) -> None:
    """Add `rows` to the file: one with the table and label of a row there replaces it in place (with
    `merge`, updates its columns and adds its command), the others are appended."""
    path = path or ROWS_FILE
    with open(path.with_name(path.name + ".lock"), "w") as lock:  # rows may finish at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        _append_locked(rows, path, merge)


def _append_locked(rows: list[dict], path: Path, merge: bool) -> None:
    kept = read_rows(path)
    where = {(r["table"], r["label"]): i for i, r in enumerate(kept)}
    for r in rows:
        i = where.get((r["table"], r["label"]))
        if i is None:
            where[(r["table"], r["label"])] = len(kept)
            kept.append(r)
        elif merge:
            old = kept[i]
            kept[i] = {**old, "columns": {**old["columns"], **r["columns"]}, "command": f"{old['command']}; {r['command']}"}
        else:
            kept[i] = r
        print(json.dumps(r), flush=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    tmp.replace(path)
