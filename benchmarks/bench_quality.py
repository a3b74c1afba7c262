"""Quality and quantization time of hf_astroquant on SmolLM2-135M, by the shared protocol.

    python benchmarks/bench_quality.py --rows fp rtn-w4 gptq-w4 rtn-w3 gptq-w3 --table results

Each row: perplexity (WikiText-2 test, 8 windows of 2048 tokens), calibration time (the
pipeline inside from_pretrained), total from_pretrained time, peak RSS, and the checkpoint's
packed bytes against the fp16 bytes of the Linears it replaces; written to the table `--table`
of benchmarks/results/rows.jsonl (results_rows.py), labelled with the row's name and settings, so
a rerun replaces it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

# The protocol: asymmetric, group size 64, damping 0.01. Rows name every solver setting they use:
# BASE also states the settings that were the defaults when the grid was measured (no act-order,
# no static groups, no clipping search), so a change of default never changes a row. Our
# recommended GPTQ setting (today's defaults) adds act-order with static groups and the clipping
# search (plain left-to-right GPTQ over-fits the out-of-domain calibration); the other rows show
# what each part is worth.
BASE = dict(group_size=64, sym=False, damp_percent=0.01, desc_act=False, static_groups=False, mse=False)
ROWS = {
    "rtn-w4": dict(bits=4, method="rtn"),
    "rtn-w3": dict(bits=3, method="rtn"),
    "gptq-w4": dict(bits=4, desc_act=True, static_groups=True, mse=True),
    "gptq-w3": dict(bits=3, desc_act=True, static_groups=True, mse=True),
    "gptq-w4-actorder": dict(bits=4, desc_act=True, static_groups=True),
    "gptq-w3-actorder": dict(bits=3, desc_act=True, static_groups=True),
    "gptq-w4-plain": dict(bits=4),
    "gptq-w3-plain": dict(bits=3),
}
# The asymmetric-calibration ablation (issue 3): every solver on the recommended grid settings
# (act-order, static groups, clipping search), alone, with the target interpolation, and with
# the bounded rounding search; 4 and 3 bits at group 64, 2 bits at group 32.
RECOMMENDED = dict(desc_act=True, static_groups=True, mse=True)
VARIANTS = {"": {}, "-interp": dict(asym_alpha="auto"), "-beam": dict(rounding="beam", beam_width=4)}
for _bits, _group in ((4, 64), (3, 64), (2, 32)):
    for _method in ("gptq", "gptaq", "rescomp")[:2 if _bits == 2 else 3]:  # rescomp needs >= 3 bits
        for _suffix, _extra in VARIANTS.items():
            ROWS.setdefault(f"{_method}{_suffix}-w{_bits}", dict(bits=_bits, group_size=_group, method=_method,
                                                                  **RECOMMENDED, **_extra))
    ROWS.setdefault(f"rtn-w{_bits}", dict(bits=_bits, group_size=_group, method="rtn"))
    if _bits < 3:
        ROWS[f"gptaq-fp8-w{_bits}"] = dict(bits=_bits, group_size=_group, method="gptaq", **RECOMMENDED, fp_samples=8)
        ROWS[f"gptaq-fp16-w{_bits}"] = dict(bits=_bits, group_size=_group, method="gptaq", **RECOMMENDED, fp_samples=16)
        continue
    # ResComp's residual on GPTQ (asym_alpha=0: no full-precision stream; the paper's "GPTQ+ResComp")
    ROWS[f"gptq-rescomp-w{_bits}"] = dict(bits=_bits, group_size=_group, method="rescomp", **RECOMMENDED,
                                          asym_alpha=0.0)
    for _method in ("gptaq", "rescomp"):  # the full-precision stream on fewer windows: D's cost against its noise
        for _fp in (8, 16):
            ROWS[f"{_method}-fp{_fp}-w{_bits}"] = dict(bits=_bits, group_size=_group, method=_method, **RECOMMENDED,
                                                       fp_samples=_fp)
# Preconditioning (issue 4): Astro and each transform, alone and combined, under GPTQ and ResComp
# on the recommended grid settings; "-plain" rows use plain GPTQ (no act-order, no clipping search).
PRECONDITIONING = {"astro": dict(astro=True), "rotate": dict(transform="rotate"), "scale": dict(transform="scale"),
                   "adaptive": dict(transform="adaptive"), "rotate-astro": dict(transform="rotate", astro=True),
                   "adaptive-astro": dict(transform="adaptive", astro=True)}
for _bits in (4, 3):
    for _method in ("gptq", "gptaq", "rescomp"):
        for _name, _extra in PRECONDITIONING.items():
            ROWS[f"{_method}-{_name}-w{_bits}"] = dict(bits=_bits, group_size=64, method=_method, **RECOMMENDED, **_extra)
    ROWS[f"gptq-astro-w{_bits}-plain"] = dict(bits=_bits, astro=True)
for _beta in (0.5, 0.25):  # Astro's trade: a smaller β moves the full-precision model less
    ROWS[f"gptq-astro-beta{_beta}-w3"] = dict(bits=3, group_size=64, **RECOMMENDED, astro=True, astro_beta=_beta)
for _method in ("gptq", "gptaq"):  # 2 bits g32, where outliers cost most
    for _name in ("rotate", "rotate-astro"):
        ROWS[f"{_method}-{_name}-w2"] = dict(bits=2, group_size=32, method=_method, **RECOMMENDED,
                                            **PRECONDITIONING[_name])
for _name in ("rotate", "rotate-astro"):  # GPTQ with the interpolated target: the best 2-bit solver alone
    ROWS[f"gptq-interp-{_name}-w2"] = dict(bits=2, group_size=32, method="gptq", **RECOMMENDED, asym_alpha="auto",
                                          **PRECONDITIONING[_name])


def packed_ratio(model, out_dir: str) -> float:
    from safetensors import safe_open

    from hf_astroquant import QuantLinear

    model.save_pretrained(out_dir)
    packed = 0
    for f in Path(out_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    t = st.get_slice(key)
                    shape, dtype = t.get_shape(), t.get_dtype()
                    packed += int(torch.tensor(shape).prod()) * {"I32": 4, "F16": 2, "F32": 4, "BF16": 2}[dtype]
    fp16 = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, QuantLinear))
    return packed / fp16

ROWS = {name: {**BASE, **opts} for name, opts in ROWS.items()}
# With every option at its default (only bits and group size set; the defaults of this commit):
# what a user gets who sets nothing else, against round-to-nearest.
for _bits in (4, 3):
    ROWS[f"defaults-w{_bits}"] = dict(bits=_bits, group_size=64)
    ROWS[f"rtn-mse-w{_bits}"] = {**BASE, "bits": _bits, "method": "rtn", "mse": True}  # RTN with the clipping search


# Block-output refinement (issue 24): the best preset of each width with refine_steps scale-tuning
# steps after each block's solve (`--set refine_lr=...` for other learning rates).
# "-rounding" rows also tune each code by up to one level (refine_rounding_lr).
for _base in ("gptaq-adaptive-w4", "gptaq-rotate-astro-w4", "gptaq-rotate-astro-w3", "gptaq-rotate-astro-w2", "gptaq-w2",
              "gptq-w2"):
    for _steps in (25, 50, 100, 200, 400):
        ROWS[f"{_base}-refine{_steps}"] = {**ROWS[_base], "refine_steps": _steps}
        ROWS[f"{_base}-refine{_steps}-rounding"] = {**ROWS[_base], "refine_steps": _steps, "refine_rounding_lr": 5e-3}


# Online rotation of the MLP output projections' input (online_rotation="down"), alone and under the
# best preconditioning of each width, with and without the refinement.
for _base in ("gptaq-rotate-w4", "gptaq-rotate-astro-w4", "gptaq-rotate-astro-w3", "gptaq-rotate-astro-w2"):
    ROWS[f"{_base}-online"] = {**ROWS[_base], "online_rotation": "down"}
    for _steps in (25, 50):
        ROWS[f"{_base}-online-refine{_steps}"] = {**ROWS[f"{_base}-online"], "refine_steps": _steps}
        ROWS[f"{_base}-online-refine{_steps}-rounding"] = {**ROWS[f"{_base}-online"], "refine_steps": _steps,
                                                           "refine_rounding_lr": 5e-3}


for _base in ("gptaq-rotate-astro-w4", "gptaq-rotate-astro-w3", "gptaq-rotate-astro-w2", "gptaq-adaptive-w4",
              "gptaq-adaptive-astro-w4"):  # o_proj's input too
    ROWS[f"{_base}-writers"] = {**ROWS[_base], "online_rotation": "writers"}
    for _steps in (25, 50):
        ROWS[f"{_base}-writers-refine{_steps}-rounding"] = {**ROWS[f"{_base}-writers"], "refine_steps": _steps,
                                                            "refine_rounding_lr": 5e-3}

# W4 (issue 24): ten times the Hessian damping (0.1 of its mean diagonal against 0.01), which regularizes
# GPTAQ's compensation toward round-to-nearest where the out-of-domain calibration misleads it.
ROWS["gptaq-rotate-astro-w4-writers-damp0.1"] = {**ROWS["gptaq-rotate-astro-w4-writers"], "damp_percent": 0.1}


def parse_settings(items: list[str]) -> dict:
    """`KEY=VALUE` option overrides (`--set`); values read as JSON where they parse, else as text."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


TABLES = ("results", "defaults", "ablation", "ablation-ppl", "preconditioning", "peers", "seeds")
SOLVERS = {"rtn": "round-to-nearest", "gptq": "GPTQ", "gptaq": "GPTAQ", "rescomp": "ResComp"}
ONLINE = {"down": "online down_proj rotation", "writers": "online o_proj + down_proj rotation"}


def describe(r: dict) -> str:
    """The row's method and the solver settings that differ from plain GPTQ (the tables' method column)."""
    if r.get("bits") == 32:
        return "full precision (fp32)"
    name = SOLVERS[r.get("method", "gptq")]
    if r.get("method") == "rescomp" and r.get("asym_alpha") == 0:
        name = "GPTQ + ResComp residual"  # asym_alpha=0: no full-precision stream
    extras = [k for k in ("desc_act", "static_groups", "mse") if r.get(k)]
    if r.get("asym_alpha") is not None:
        extras.append(f"asym_alpha={r['asym_alpha']}")
    if r.get("rounding", "gptq") != "gptq":
        extras.append(r["rounding"] + (f" K={r['beam_width']}" if r["rounding"] == "beam" else ""))
    if r.get("fp_samples"):
        extras.append(f"fp_samples={r['fp_samples']}")
    return f"hf_astroquant {name}" + (f" ({', '.join(extras)})" if extras else "")


def configuration(r: dict) -> str:
    """describe() with the preconditioning, damping and refinement spelled out (the peers tables)."""
    pre = [x for x in (r.get("transform", "none"), "Astro" if r.get("astro") else None,
                       ONLINE.get(r.get("online_rotation", "none"))) if x and x != "none"]
    text = describe(r).replace(" (desc_act, static_groups, mse)", "") + (f" + {' + '.join(pre)}" if pre else "")
    if r.get("astro") and r.get("astro_beta", 1.0) != 1.0:
        text += f" (Astro β {r['astro_beta']})"
    if r.get("damp_percent", 0.01) != 0.01:
        text += f", damping {r['damp_percent']}"
    if r.get("refine_steps"):
        text += f", {r['refine_steps']} refine steps (lr {r.get('refine_lr', 'default')}"
        text += f"; rounding too, lr {r['refine_rounding_lr']})" if r.get("refine_rounding_lr") else ")"
    return text


def preconditioning(r: dict) -> str:
    """Astro (and its β) and the transform, or 'none' (the preconditioning table's column)."""
    astro = ("Astro" + (f" β={r['astro_beta']}" if r.get("astro_beta", 1.0) != 1.0 else "")) if r.get("astro") else ""
    return " + ".join(p for p in (astro, r.get("transform", "none")) if p and p != "none") or "none"


def table_row(row: dict, table: str, settings: dict, sitting: str | None = None, **kw) -> dict:
    """`row` (run_row's, with the run's domain and seed) in the schema of results_rows: labelled with the
    row's name, its calibration seed when not 0 and its `--set` settings, so a rerun replaces it."""
    name, seed, domain, windows = row["row"], row.get("calibration_seed", 0), row.get("domain", "out"), row.get(
        "ppl_windows", 8)
    sets = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(settings.items())]
    protocol_args = {"seed": seed, "domain": domain, "windows": windows}
    changed = {k: v for k, v in protocol_args.items() if v != {"seed": 0, "domain": "out", "windows": 8}[k]}
    names = {"seed": "calibration-seed", "domain": "domain", "windows": "ppl-windows"}
    label = " ".join([name] + [f"{names[k]}={v}" for k, v in changed.items()] + sets)
    args = (["--rows", name] + [x for k, v in changed.items() for x in (f"--{k}", str(v))]
            + ["--set", *sets] * bool(sets) + ["--table", table] + ["--sitting", sitting] * bool(sitting))
    kw.setdefault("command", results_rows.command([__file__, *args]))
    columns = {**row, "name": describe(row), "configuration": configuration(row), "preconditioning": preconditioning(row)}
    return results_rows.row(table, label, columns, sitting=sitting, **kw)


def run_row(name: str, ckpt: str, windows: torch.Tensor, test_ids: torch.Tensor, n_windows: int,
            settings: dict | None = None) -> dict:
    import hf_astroquant
    from hf_astroquant.eval import perplexity
    from transformers import AutoModelForCausalLM

    row: dict = {"row": name, "tool": "hf_astroquant"}
    if name == "fp":
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        row.update(bits=32)
    else:
        opts = {**ROWS[name], **(settings or {})}
        cfg = hf_astroquant.AstroQuantConfig(dataset=windows, **opts)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=cfg)
        row.update(opts)
        if cfg.refine_steps:  # the learning rate in effect, default or not
            row.update(refine_lr=cfg.refine_lr, refine_batch_size=cfg.refine_batch_size,
                       refine_rounding_lr=cfg.refine_rounding_lr)
        row["from_pretrained_seconds"] = round(time.perf_counter() - start, 1)
        row["quant_seconds"] = round(model.hf_quantizer.report.seconds, 1)
        report = model.hf_quantizer.report
        if report.asym_alpha:
            alphas = sorted(report.asym_alpha.values())
            row["asym_alpha_median"] = round(alphas[len(alphas) // 2], 3)
        row["fp_stream_gib"] = round(report.fp_stream_bytes / 2**30, 3)
        row["phase_seconds"] = {k: round(v, 1) for k, v in report.phase_seconds.items()}
        if report.refine_loss:  # the output loss the scale tuning left, over the solved scales', per block
            kept = [after / before for before, after in report.refine_loss.values() if before > 0]
            row["refine_loss_ratio_median"] = round(sorted(kept)[len(kept) // 2], 4)
        with tempfile.TemporaryDirectory() as d:
            row["checkpoint_ratio_vs_fp16"] = round(packed_ratio(model, d), 4)
    row["ppl"] = round(perplexity(model, test_ids, 2048, n_windows), 2)
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["fp", "rtn-w4", "gptq-w4", "rtn-w3", "gptq-w3"],
                    help=f"fp and any of {sorted(ROWS)}")
    ap.add_argument("--domain", default="out", choices=["out", "in"])
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the calibration windows (0: the protocol's; others: other windows of the same text)")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 2048 tokens (147 = all)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="option overrides for the rows (recorded in each row), e.g. refine_lr=0.005")
    ap.add_argument("--sitting", help="label of the sitting, recorded in each row (default: the date)")
    ap.add_argument("--table", default="results", choices=TABLES,
                    help="the table of benchmarks/results/rows.jsonl the rows go to (see update_readme.py)")
    args = ap.parse_args()
    args.sitting = args.sitting or datetime.date.today().isoformat()  # one sitting for all the rows
    from transformers import AutoTokenizer

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = protocol.calibration_windows(tok, args.domain, seed=args.seed)
    test_ids = protocol.wikitext_test_ids(tok)
    for name in args.rows:
        # every row in a fresh process: peak RSS and timing are then per row
        import subprocess

        if len(args.rows) > 1:
            subprocess.run([sys.executable, __file__, "--rows", name, "--domain", args.domain, "--seed", str(args.seed), "--windows",
                            str(args.windows), "--table", args.table, "--set", *args.set]
                           + ["--sitting", args.sitting], check=True)
            continue
        settings = parse_settings(args.set)
        row = run_row(name, ckpt, windows, test_ids, args.windows, settings)
        row.update(domain=args.domain, calibration_seed=args.seed, ppl_windows=args.windows, torch_threads=torch.get_num_threads())
        results_rows.append_rows([table_row(row, args.table, settings, args.sitting)])


if __name__ == "__main__":
    main()
