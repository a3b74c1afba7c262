"""The family matrix of tests/test_families.py, run once and recorded: one row per family in the table
`families` of benchmarks/results/rows.jsonl, which renders the README's supported-models table and
docs/families.md (python benchmarks/update_readme.py).

    python benchmarks/family_matrix.py [--families llama qwen3 ...]

Per family (tiny random model, hidden 64, 2 blocks; 16 calibration windows of 32 tokens; W4 g16):
for gptq and gptaq the packed Linears, the block weights left in full precision (walking the
parameters) and the routers, GPTAQ's full-precision stream against the model's own block outputs
(max relative deviation), whether the reload gives identical logits; the pipeline's block inputs
replayed against the model's own hidden states; per transform 'exact' (fp32 fold keeps the logits)
or the reason it is refused.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_rows  # noqa: E402


def family_row(family: str, root: Path) -> dict:
    from families import LABELS, TRANSFORMS, fold_outcome, quantize_checked, replay_deviation, tiny_model
    from test_families import DATA

    t0 = time.perf_counter()
    model = tiny_model(family)
    model.save_pretrained(root / family)
    methods = {}
    for method in ("gptq", "gptaq"):
        got = quantize_checked(family, method, root / family, root / f"{family}-{method}", DATA)
        got["full_precision"], got["routers"] = sorted(got["full_precision"]), sorted(got["routers"])
        methods[method] = got
    transforms = {t: fold_outcome(family, t, DATA[:2]) for t in TRANSFORMS}
    return dict(family=family, label=LABELS[family], model_class=type(model).__name__, methods=methods,
                replay_deviation=replay_deviation(model, DATA[:4]),
                transforms={t: ("exact" if o.startswith("exact") else o) for t, o in transforms.items()},
                fold_deviation={t: float(o.split()[1]) for t, o in transforms.items() if o.startswith("exact")},
                seconds=round(time.perf_counter() - t0, 1))


def checks(r: dict) -> str:
    """'yes' when gptq and gptaq both packed every block matrix but the routers, reloaded to identical
    logits and (gptaq) streamed the model's own hidden states; else what failed."""
    failed = []
    for method, m in r["methods"].items():
        if set(m["full_precision"]) != {f"{x}.weight" for x in m["routers"]}:
            failed.append(f"{method}: left {', '.join(m['full_precision'])}")
        if not m["reload_identical"]:
            failed.append(f"{method}: reload differs")
        if m["fp_stream_deviation"] is not None and m["fp_stream_deviation"] >= 1e-5:
            failed.append(f"{method}: stream off by {m['fp_stream_deviation']:.1e}")
    if r["replay_deviation"] >= 1e-6:
        failed.append(f"block inputs off by {r['replay_deviation']:.1e}")
    return "; ".join(failed) or "yes"


def refusal(outcome: str) -> str:
    """A transform's outcome in a few words: exact, or why it is refused (preconditioning's reasons)."""
    if outcome == "exact":
        return "exact"
    post = re.search(r"\.(\w+) normalizes a sublayer's output", outcome)
    if post:
        return f"refused: post-norm `{post.group(1)}`"
    norm = re.search(r"\((\w+)\) is neither", outcome)
    if norm:
        return f"refused: {norm.group(1)} is no norm the folds know"
    if "multimodal" in outcome:
        return "refused: the projector writes the stream"
    missing = re.search(r"has no (.*?)(?: reading| writing|\. Use|$)", outcome)
    return f"refused: no {missing.group(1)}" if missing else outcome


def transforms_in_short(t: dict) -> str:
    """'all exact', or which transforms fold and why the others are refused."""
    if all(o == "exact" for o in t.values()):
        return "all exact"
    why = sorted({"post-norms" if "post-norm" in refusal(o) else refusal(o).removeprefix("refused: ")
                  for o in t.values() if o != "exact"})
    exact, refused = [x for x in t if t[x] == "exact"], [x for x in t if t[x] != "exact"]
    return (f"{', '.join(exact)} exact; " if exact else "") + f"{', '.join(refused)} refused ({'; '.join(why)})"


def table_row(r: dict, **kw) -> dict:
    """A family's row in the schema of results_rows, with the tables' cells worked out."""
    said = [refusal(o) for o in r["transforms"].values()]
    routers = {x.rsplit(".", 1)[-1] for m in r["methods"].values() for x in m["routers"]}
    return results_rows.row("families", r["family"], {
        **r, "name": r["label"], "checks": checks(r), "kept": f"routers ({', '.join(f'`{x}`' for x in sorted(routers))})" if routers
        else "nothing", "kept_short": "routers" if r["methods"]["gptq"]["routers"] else "nothing",
        "transforms_cell": f"{said[0]} (all three)" if len(set(said)) == 1 and said[0] != "exact" else " · ".join(said),
        "transforms_short": transforms_in_short(r["transforms"])}, **kw)


def main() -> None:
    import torch
    import transformers
    from families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            row = family_row(family, Path(tmp))
            row.update(transformers=transformers.__version__, torch=torch.__version__)
            command = results_rows.command([__file__, "--families", family])
            results_rows.append_rows([table_row(row, command=command)])


if __name__ == "__main__":
    main()
