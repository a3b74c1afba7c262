"""Render the results table in README.md from benchmarks/results/ (between the marker comments).

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load_rows() -> list[dict]:
    rows = []
    for f in sorted(RESULTS.glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    for f in sorted(RESULTS.glob("*.json")):
        rows.append(json.loads(f.read_text()))
    return rows


def describe(r: dict) -> str:
    if r.get("bits") == 32:
        return "full precision (fp32)"
    if r["tool"] != "hf_astroquant":
        return f"{r['tool']} (actorder {r.get('actorder', 'none')})"
    name = {"rtn": "round-to-nearest", "gptq": "GPTQ"}[r.get("method", "gptq")]
    extras = [k for k in ("desc_act", "static_groups", "mse") if r.get(k)]
    return f"hf_astroquant {name}" + (f" ({', '.join(extras)})" if extras else "")


def render(rows: list[dict]) -> str:
    lines = ["| method | bits | group | WikiText-2 ppl | quantize s | checkpoint / fp16 linears | calibration |",
             "|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (-r.get("bits", 0), r["tool"] != "hf_astroquant", r.get("ppl", 0)))
    for r in order:
        bits = "fp32" if r.get("bits") == 32 else r["bits"]
        group = r.get("group_size", "")
        secs = r.get("quant_seconds", "")
        ratio = r.get("checkpoint_ratio_vs_fp16", "")
        domain = {"out": "Python docs 64x512", "in": "WikiText-2 valid 64x512"}.get(r.get("domain"), "")
        if r.get("method") == "rtn" or r.get("bits") == 32:
            domain = ""
        lines.append(f"| {describe(r)} | {bits} | {group} | {r['ppl']:.2f} | {secs} | {ratio} | {domain} |")
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(load_rows())}\n{END}{tail}")
    print(render(load_rows()))


if __name__ == "__main__":
    main()
