"""Render the generated tables of README.md and docs/*.md (between marker comments) from the rows of
benchmarks/results/rows.jsonl (one schema, results_rows.py) and from hf_astroquant's option table.

    python benchmarks/update_readme.py           # rewrite the tables
    python benchmarks/update_readme.py --check   # change nothing; exit 1, naming the files, if one is stale

Each marker renders one `Table` spec of tables.py: the tables of rows it shows, which rows, their
order, its columns (header, cell). Rows with one `group` key make one line (its cells take the
group's rows); rows whose columns hold a "note" are the paragraphs under the table. A marker pair
lives in exactly one file; a pair in no file is an error (a table would be lost).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the bench scripts, and this checkout's hf_astroquant (its options)
from results_rows import read_rows  # noqa: E402


@dataclass
class Table:
    tables: tuple[str, ...]  # the tables whose rows it shows, in this order
    columns: list | Callable  # [(header, cell)], or a function of the shown rows giving them
    where: Callable = lambda r: True  # which rows (r["_all"]: every row of its tables)
    order: Callable | None = None  # sort key of the rows (stable; else the file's order)
    group: Callable | None = None  # rows with one key make one line; its cells take the list of rows
    note: Callable | None = None  # a paragraph under the table, from the shown rows
    text: Callable | None = None  # instead of a table: text from the lines (rows or groups)
    notes: bool = True  # the note rows of its tables go under it

    def render(self, rows: list[dict]) -> str:
        mine = [{**r["columns"], **{k: v for k, v in r.items() if k != "columns"}} for t in self.tables
                for r in rows if r["table"] == t]
        notes = [r["note"] for r in mine if "note" in r and self.notes]
        mine = [r for r in mine if "note" not in r]
        for r in mine:
            r["_all"] = mine
        lines = shown = sorted(filter(self.where, mine), key=self.order or (lambda r: 0))
        if self.group:
            groups: dict = {}
            for r in shown:
                groups.setdefault(self.group(r), []).append(r)
            lines = list(groups.values())
        if self.text:
            return self.text(lines)
        cols = self.columns(shown) if callable(self.columns) else self.columns
        out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(cell(x)) for _, cell in cols) + " |" for x in lines]
        notes += [n for n in [self.note and self.note(shown)] if n]
        return "\n".join(out + [x for n in notes for x in ("", n)])


def cell(key: str, fmt: str = "") -> Callable:
    return lambda r: "" if r.get(key) is None else format(r[key], fmt)


def first(key: str, fmt: str = "") -> Callable:
    return lambda g: cell(key, fmt)(g[0])


def versus(key: str, is_base: Callable) -> Callable:
    """r[key] over the mean of its baselines' (the rows b of its tables with is_base(r, b)); None without."""
    def f(r):
        base = [b[key] for b in r["_all"] if is_base(r, b)]
        return r[key] / (sum(base) / len(base)) if base else None
    return f


def times(key: str, is_base: Callable) -> Callable:
    return lambda r: "" if versus(key, is_base)(r) is None else f"{versus(key, is_base)(r):.2f}"


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def render_all() -> dict[str, str]:
    """Marker name: its text (the option tables from hf_astroquant, every other from the rows)."""
    from hf_astroquant.options import options_table
    from tables import SECTIONS

    rows = read_rows()
    out = {name: "\n\n".join(t.render(rows) for t in (spec if isinstance(spec, tuple) else (spec,)))
           for name, spec in SECTIONS.items()}
    return {**out, "options": options_table(), "options-detail": options_table(detail=True)}


def rendered_files() -> dict[Path, str]:
    """README.md and docs/*.md, each with its generated tables as they should be."""
    texts = {f: f.read_text() for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for name, body in render_all().items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        homes = [f for f, t in texts.items() if start in t]
        if len(homes) != 1:
            raise SystemExit(f"{start} is in {len(homes)} files ({[str(f) for f in homes]}); it must be in one")
        head, rest = texts[homes[0]].split(start, 1)
        texts[homes[0]] = f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated table is stale")
    args = ap.parse_args()
    stale = {f: t for f, t in rendered_files().items() if f.read_text() != t}
    for f, text in stale.items():
        print(f"{'stale' if args.check else 'rendered'}: {f.relative_to(ROOT)}")
        if not args.check:
            f.write_text(text)
    if args.check and stale:
        raise SystemExit("stale: run python benchmarks/update_readme.py")


if __name__ == "__main__":
    main()
