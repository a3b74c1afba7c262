"""The family matrix of tests/test_families.py, run once and recorded: one row per family in
benchmarks/results/families.jsonl, which renders the README's supported-models table and
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
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results" / "families.jsonl"


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


def main() -> None:
    import torch
    import transformers
    from families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            row = family_row(family, Path(tmp))
            row.update(transformers=transformers.__version__, torch=torch.__version__)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("family", "model_class", "transforms", "seconds")}), flush=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
