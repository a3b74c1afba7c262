"""Render the generated tables of README.md and docs/*.md (between marker comments) from
benchmarks/results/ and from the options table of hf_astroquant (`options.OPTIONS`).

    python benchmarks/update_readme.py

Each marker pair lives in one file; a pair found in no file is an error (a table would be lost).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# issue 3's ablation, rows run alone, in sittings: its own table, times relative to GPTQ of the same
# sitting (s6 ran the grid's cells s5 did not, with GPTQ again at each width as its baseline)
ABLATION = (RESULTS / "ablation-s5.jsonl", RESULTS / "ablation-s6.jsonl")
ABL_START, ABL_END = "<!-- ablation:start -->", "<!-- ablation:end -->"
# earlier sittings (timings disturbed by other work, or another day's machine): perplexity only,
# for the rows the timed sitting did not run
ABLATION_PPL = (RESULTS / "ablation.jsonl", RESULTS / "ablation-s3.jsonl", RESULTS / "ablation-s4.jsonl")
ABL2_START, ABL2_END = "<!-- ablation-ppl:start -->", "<!-- ablation-ppl:end -->"
SPEED = (RESULTS / "speed.jsonl",)
SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"
EXPORT = (RESULTS / "export.jsonl",)  # bench_export.py: GPTQ exports in GPTQModel
EXPORT_START, EXPORT_END = "<!-- export:start -->", "<!-- export:end -->"
VLLM = (RESULTS / "vllm.jsonl",)  # bench_vllm.py: exports served by vLLM's CPU build
VLLM_START, VLLM_END = "<!-- vllm:start -->", "<!-- vllm:end -->"
VLLM_SUMMARY_START, VLLM_SUMMARY_END = "<!-- vllm-summary:start -->", "<!-- vllm-summary:end -->"
GGUF = (RESULTS / "gguf.jsonl",)  # bench_gguf.py: GGUF files in llama.cpp, its quantizer against ours
GGUF_START, GGUF_END = "<!-- gguf:start -->", "<!-- gguf:end -->"
GGUF_SUMMARY_START, GGUF_SUMMARY_END = "<!-- gguf-summary:start -->", "<!-- gguf-summary:end -->"
OFFLOAD = RESULTS / "offload.json"
OFFLOAD_START, OFFLOAD_END = "<!-- offload:start -->", "<!-- offload:end -->"
MOE_MEMORY = RESULTS / "moe_memory.json"  # bench_moe_memory.py renders its own table (its --render-only too)
MOE_OPTIONS = RESULTS / "moe_options.json"  # bench_moe_options.py: the same
FP_STREAM = RESULTS / "fp_stream.json"  # bench_fp_stream.py: its table in docs/big-models.md
PRE_START, PRE_END = "<!-- preconditioning:start -->", "<!-- preconditioning:end -->"
PRECONDITIONING = RESULTS / "preconditioning.jsonl"
# rows run on another day (the ablation's sitting s6): perplexity against the same GPTQ, but their
# seconds against the GPTQ of their own sitting only (ablation-s6.jsonl), so no ratio in this table
PRECONDITIONING_LATER = RESULTS / "preconditioning-s6.jsonl"
ASTRO = RESULTS / "astro.json"
ASTRO_BETA = RESULTS / "astro-beta.json"  # bench_astro.py --betas: the reshaped fp model's perplexity per β
PEERS = (RESULTS / "peers.jsonl",)  # issue 24: our best presets and the strongest peers, in one sitting
PEERS_START, PEERS_END = "<!-- peers:start -->", "<!-- peers:end -->"
PEERS_SUMMARY_START, PEERS_SUMMARY_END = "<!-- peers-summary:start -->", "<!-- peers-summary:end -->"
# the spread across random seeds of the W4 rows that tie (ours: `seed`, which draws every rotation; QuIP:
# `--transform-seed`); the rows of peers.jsonl with the same configuration count as their default seed
SEEDS = (RESULTS / "peers.jsonl", RESULTS / "seeds.jsonl")
SEEDS_START, SEEDS_END = "<!-- seeds:start -->", "<!-- seeds:end -->"
SEEDS_SUMMARY_START, SEEDS_SUMMARY_END = "<!-- seeds-summary:start -->", "<!-- seeds-summary:end -->"
FAMILIES = (RESULTS / "families.jsonl",)  # family_matrix.py: the tiny-model family matrix of tests/test_families.py
FAMILIES_START, FAMILIES_END = "<!-- families:start -->", "<!-- families:end -->"
FAMILIES_SUMMARY_START, FAMILIES_SUMMARY_END = "<!-- families-summary:start -->", "<!-- families-summary:end -->"


def load_rows() -> list[dict]:
    rows = []
    for f in sorted(RESULTS.glob("*.jsonl")):
        if f.name.startswith(("ablation", "speed", "export", "preconditioning", "vllm", "gguf", "families", "peers", "seeds")):  # their own tables
            continue
        rows += read_jsonl(f)
    for f in sorted(RESULTS.glob("*.json")):
        if f not in (OFFLOAD, MOE_MEMORY, MOE_OPTIONS, FP_STREAM, ASTRO, ASTRO_BETA):  # their own tables
            rows.append(json.loads(f.read_text()))
    return rows


def describe(r: dict) -> str:
    if r.get("bits") == 32:
        return "full precision (fp32)"
    if r["tool"] != "hf_astroquant":
        return f"{r['tool']} (actorder {r.get('actorder', 'none')})"
    name = {"rtn": "round-to-nearest", "gptq": "GPTQ", "gptaq": "GPTAQ", "rescomp": "ResComp"}[r.get("method", "gptq")]
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


def render(rows: list[dict]) -> str:
    lines = ["| method | bits | group | WikiText-2 ppl | quantize s | peak RSS GiB | checkpoint / fp16 linears | calibration |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (-r.get("bits", 0), r["tool"] != "hf_astroquant", r.get("ppl", 0)))
    for r in order:
        bits = "fp32" if r.get("bits") == 32 else r["bits"]
        group = r.get("group_size", "")
        secs = r.get("quant_seconds", "")
        ratio = r.get("checkpoint_ratio_vs_fp16", "")
        domain = {"out": "Python docs 64x512", "in": "WikiText-2 valid 64x512"}.get(r.get("domain"), "")
        if r.get("method") == "rtn" or r.get("bits") == 32:
            domain = ""
        rss = r.get("peak_rss_gib", "")
        lines.append(f"| {describe(r)} | {bits} | {group} | {r['ppl']:.2f} | {secs} | {rss} | {ratio} | {domain} |")
    return "\n".join(lines)


def describe_peer(r: dict) -> str:
    """A peers.jsonl row: the tool and what of it ran."""
    tool = r["tool"]
    if tool == "hf_astroquant":
        pre = " + ".join(x for x in (r.get("transform") if r.get("transform", "none") != "none" else None,
                                     "Astro" if r.get("astro") else None,
                                     {"down": "online down_proj rotation", "writers": "online o_proj + down_proj rotation"}
                                     .get(r.get("online_rotation", "none")))
                         if x)
        text = describe(r).replace(" (desc_act, static_groups, mse)", "")
        text += f" + {pre}" if pre else ""
        if r.get("astro") and r.get("astro_beta", 1.0) != 1.0:
            text += f" (Astro β {r['astro_beta']})"
        if r.get("rotation_candidates", 1) > 1:
            text += f", {r['rotation_candidates']} rotation candidates per layer"
        if r.get("damp_percent", 0.01) != 0.01:
            text += f", damping {r['damp_percent']}"
        if r.get("refine_steps"):
            text += f", {r['refine_steps']} refine steps (lr {r.get('refine_lr', 'default')}"
            text += f"; rounding too, lr {r['refine_rounding_lr']})" if r.get("refine_rounding_lr") else ")"
        return text
    if tool == "AutoRound":
        return f"AutoRound {r['version']}, recipe {r['recipe']} ({r['iters']} iterations, lr {r['lr'] or '1/iters'})"
    if tool.startswith("GPTQModel"):
        if r["rotation"] == "none":  # its rotation calls .cuda(): see peer_gptqmodel.py
            return f"{tool} {r['version']} (act-order; its rotation needs CUDA, not run)"
        return f"{tool} {r['version']} + {r['rotation']} rotation (act-order)"
    if r.get("transform"):
        rot = {"quip": "QuIP (v)", "spinquant": "SpinQuant (R1, R2)"}[r["transform"]]
        damping = f", damping {r['dampening_frac']}" if "dampening_frac" in r else ""
        return f"{tool} + {rot}, {r['transform_type']} (act-order {r.get('actorder', 'none')}){damping}"
    return f"{tool} (act-order {r.get('actorder', 'none')})"


def render_peers(rows: list[dict]) -> str:
    """Every row of the peers sitting: ours and the peers', by width, best first."""
    lines = ["| tool and configuration | bits | group | WikiText-2 ppl | quantize s | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    shared = []
    for r in sorted(rows, key=lambda r: (-r["bits"], r["ppl"])):
        mark = ""
        if r.get("machine_shared"):  # its time is overstated: say by what (one mark per reason)
            if r["machine_shared"] not in shared:
                shared.append(r["machine_shared"])
            mark = "*" * (shared.index(r["machine_shared"]) + 1)
        lines.append(f"| {describe_peer(r)} | {r['bits']} | {r['group_size']} | {r['ppl']:.2f} | {r['quant_seconds']}{mark} "
                     f"| {r.get('peak_rss_gib', '')} |")
    if shared:
        lines += ["", "Time overstated: the machine was shared ("
                  + "; ".join(f"{'*' * (i + 1)} {why}" for i, why in enumerate(shared)) + ")."]
    return "\n".join(lines)


def best_preset_rows() -> set[str]:
    """The bench_quality rows our `best` presets were measured as."""
    from hf_astroquant.presets import PRESETS

    return {row for (quality, _), (_, row) in PRESETS.items() if quality == "best"}


def render_peers_summary(rows: list[dict]) -> str:
    """Per width, each peer's lowest perplexity in the peers sitting, and our `best` preset's row
    where the sitting ran it, else our lowest (ppl · quantize seconds · peak RSS)."""
    from hf_astroquant.config import AstroQuantConfig

    best_rows = best_preset_rows()
    lr = AstroQuantConfig.option("refine_lr").default  # a learning-rate ablation is not the preset
    preset = [r for r in rows if r.get("row") in best_rows and r.get("tool") == "hf_astroquant"
              and r.get("refine_lr", lr) == lr]
    alone = {r["row"] for r in preset if not r.get("machine_shared")}  # a rerun alone replaces a shared run
    preset = [r for r in preset if not (r.get("machine_shared") and r["row"] in alone)]
    rows = [r for r in rows if r.get("tool") != "hf_astroquant" or r in preset
            or not any(p["bits"] == r["bits"] for p in preset)]

    def tool(r):
        return r["tool"].split()[0]

    tools = sorted({tool(r) for r in rows}, key=lambda t: (t != "hf_astroquant", t))
    lines = ["| bits, group | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        cells = []
        for t in tools:
            mine = [r for r in rows if r["bits"] == bits and tool(r) == t]
            best = min(mine, key=lambda r: r["ppl"]) if mine else None
            mark = "*" if best and best.get("machine_shared") else ""  # time overstated: docs/results.md says why
            cells.append(f"{best['ppl']:.2f} · {best['quant_seconds']:.0f} s{mark} · {best['peak_rss_gib']:.1f} GiB"
                         if best else "not run")
        group = next(r["group_size"] for r in rows if r["bits"] == bits)
        lines.append(f"| W{bits} g{group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_groups(rows: list[dict]) -> list[tuple[str, dict, list[tuple[str, float]]]]:
    """(configuration, a row of it, [(seed, ppl)]) for each configuration that the seed study ran with a
    seed set (`seed` or `transform_seed` in the row), its other rows counted at their default seed."""
    def key(r):
        return describe_peer(r), r["bits"], r["group_size"]

    def seed_of(r):
        if "transform_seed" in r:
            return str(r["transform_seed"])
        return str(r.get("seed", 0)) if r["tool"] == "hf_astroquant" else "default"

    # a seed set explicitly, or a setting tried beside the seed study (damping)
    studied = {key(r) for r in rows if {"transform_seed", "seed", "dampening_frac"} & r.keys()}
    groups: dict = {}
    for r in rows:
        if key(r) in studied:
            groups.setdefault(key(r), (r, {}))[1].setdefault(seed_of(r), r["ppl"])
    return [(k[0], r, sorted(runs.items())) for k, (r, runs) in sorted(groups.items(), key=lambda g: (-g[0][1], g[0][0]))]


def spread(runs: list[tuple[str, float]]) -> tuple[float, float, float]:
    """(mean, min, max) of the runs' perplexities."""
    ppl = [p for _, p in runs]
    return sum(ppl) / len(ppl), min(ppl), max(ppl)


def render_seeds(rows: list[dict]) -> str:
    """Perplexity of each studied configuration at each seed, the mean and the range."""
    lines = ["| tool and configuration | bits | group | ppl at each seed | mean | min-max |", "|---|---|---|---|---|---|"]
    for name, r, runs in seed_groups(rows):
        lines.append(f"| {name} | {r['bits']} | {r['group_size']} | " + ", ".join(f"{p:.2f} ({s})" for s, p in runs)
                     + " | {:.2f} | {:.2f}-{:.2f} |".format(*spread(runs)))
    return "\n".join(lines)


def render_seeds_summary(rows: list[dict]) -> str:
    """One line for the README: the mean and range of each configuration run at three seeds or more."""
    best = best_preset_rows()
    parts = []
    for name, r, runs in seed_groups(rows):
        if len(runs) < 3:
            continue
        if r["tool"] == "hf_astroquant":
            label = "hf_astroquant " + ("`best`" if r.get("row") in best else f"`{r['row']}`")
            damping = r.get("damp_percent", 0.01)
        else:
            label = r["tool"] + {"quip": " + QuIP", "spinquant": " + SpinQuant"}.get(r.get("transform"), "")
            damping = r.get("dampening_frac", 0.01)
        parts.append(f"{label} at damping {damping}: " + "{:.2f} ({:.2f}-{:.2f}".format(*spread(runs))
                     + f", {len(runs)} seeds)")
    return ("W4 across the random rotations' seeds, mean (range): " + "; ".join(parts)
            + " ([docs/results.md](docs/results.md#w4-how-much-is-the-draw-of-the-random-rotations)).")


def render_ablation(rows: list[dict]) -> str:
    """The ablation rows with time and peak RSS relative to GPTQ at the same bit width in the
    same sitting (`sitting`: the results file's name; the mean where GPTQ ran more than once)."""
    runs: dict = {}
    for r in rows:
        if r.get("method", "gptq") == "gptq" and not r.get("asym_alpha") and r.get("rounding", "gptq") == "gptq":
            runs.setdefault((r.get("sitting"), r["bits"]), []).append(r)
    base = {k: {m: sum(r[m] for r in v) / len(v) for m in ("quant_seconds", "peak_rss_gib")} for k, v in runs.items()}
    lines = ["| method | bits | group | WikiText-2 ppl | sitting | quantize s | × GPTQ time | solve s | statistics s "
             "| fp stream s | other s | peak RSS GiB | × GPTQ RSS | fp stream GiB | median α |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["bits"], r["ppl"], r.get("sitting") or "")):
        b = base.get((r.get("sitting"), r["bits"]))
        t = f"{r['quant_seconds'] / b['quant_seconds']:.2f}" if b else ""
        m = f"{r['peak_rss_gib'] / b['peak_rss_gib']:.2f}" if b else ""
        ph = r.get("phase_seconds", {})  # bench_quality.py records where the seconds went
        phases = " | ".join(str(ph.get(k, "")) for k in ("solve", "statistics", "fp_stream", "other"))
        lines.append(f"| {describe(r)} | {r['bits']} | {r['group_size']} | {r['ppl']:.2f} | {r.get('sitting', '')} "
                     f"| {r['quant_seconds']} | {t} "
                     f"| {phases} | {r['peak_rss_gib']} | {m} | {r.get('fp_stream_gib', '')} | "
                     f"{r.get('asym_alpha_median', '')} |")
    return "\n".join(lines)


def render_speed(rows: list[dict]) -> str:
    """Decode/prefill speed per model, relative to the same model in fp32 (latest row of each kind)."""
    latest = {(r["model"], r["variant"], r["dtype"]): r for r in rows}
    lines = ["| model | weights | activations | forward path | decode tok/s (batch 1) | × fp32 | prefill tok/s | "
             "× fp32 | checkpoint GiB | peak RSS after load GiB | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, variant, dtype), r in latest.items():
        base = latest.get((model, "fp", "fp32"))
        weights = "full precision" if variant == "fp" else f"{variant[1:]}-bit g64"
        path = "" if variant == "fp" else "/".join(r.get("active_backends", []))
        dec = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else ""
        pre = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}" if base else ""
        lines.append(f"| {model} | {weights} | {dtype} | {path} | {r['decode_tok_s']} | {dec} | {r['prefill_tok_s']} "
                     f"({r['prefill_shape']}) | {pre} | {r['checkpoint_gib']} | {r['load_peak_rss_gib']} | {r['peak_rss_gib']} |")
    return "\n".join(lines)


def render_ablation_ppl(rows: list[dict]) -> str:
    lines = ["| method | bits | group | WikiText-2 ppl | fp stream GiB | median α |", "|---|---|---|---|---|---|"]
    timed = {r["row"] for f in ABLATION if f.exists() for r in read_jsonl(f)}
    latest = {r["row"]: r for r in rows if r["row"] not in timed}
    for r in sorted(latest.values(), key=lambda r: (-r["bits"], r["ppl"])):
        lines.append(f"| {describe(r)} | {r['bits']} | {r['group_size']} | {r['ppl']:.2f} | "
                     f"{r.get('fp_stream_gib', '')} | {r.get('asym_alpha_median', '')} |")
    return "\n".join(lines)


def render_export(rows: list[dict]) -> str:
    """Relative logit errors of GPTQ exports in GPTQModel (latest row per configuration)."""
    lines = ["| config | format | GPTQModel (fp16) vs ours (fp16) | GPTQModel (fp16) vs exact | ours (fp16) vs exact |",
             "|---|---|---|---|---|"]
    for r in {r["config"]: r for r in rows}.values():
        lines.append(f"| {r['config']} | {r['format']} | {r['gptqmodel_vs_ours_fp16']:.2e} | "
                     f"{r['gptqmodel_vs_truth']:.2e} | {r['ours_fp16_vs_truth']:.2e} |")
    return "\n".join(lines)


def render_vllm(rows: list[dict]) -> str:
    """Perplexity of exports in vLLM against ours on the same tokens (latest row per configuration)."""
    lines = ["| config | export | tokens | ours (fp32) | ours (fp16) | vLLM (fp16) | vLLM vs ours (fp32) | vLLM kernel "
             "| HTTP server |", "|---|---|---|---|---|---|---|---|---|"]
    for r in {r["config"]: r for r in rows}.values():
        server = (f"answered ({r['server_seconds_to_start']:.0f} s to start)" if r.get("server_text")
                  else "not run" if r.get("server_text") is None else "empty answer")
        lines.append(f"| {r['config']} | {r['format']} | {r['tokens']} | {r['ours_fp32']:.3f} | {r['ours_fp16']:.3f} | "
                     f"{r['vllm_fp16']:.3f} | {r['vllm_vs_ours_fp32']:+.2%} | {r['vllm_kernel']} | {server} |")
    return "\n".join(lines)


def render_vllm_summary(rows: list[dict]) -> str:
    """The README's short version of render_vllm."""
    lines = ["| checkpoint | export | perplexity, ours (fp32) | in vLLM (fp16) |", "|---|---|---|---|"]
    for r in {r["config"]: r for r in rows}.values():
        lines.append(f"| {VLLM_NAMES.get(r['config'], r['config'])} | {r['format']} | {r['ours_fp32']:.2f} | "
                     f"{r['vllm_fp16']:.2f} ({r['vllm_vs_ours_fp32']:+.2%}) |")
    return "\n".join(lines)


VLLM_NAMES = {"best-w4": "GPTAQ + adaptive, W4 g64 (asymmetric)", "gptq-w4": "defaults, W4 g64 (asymmetric)",
              "gptq-sym-w4": "defaults + `sym`, W4 g64"}


def _latest(rows: list[dict]) -> dict[str, dict]:
    return {r["row"]: r for r in rows}  # a rerun of a row replaces it


GGUF_KINDS = {"llamacpp": "llama.cpp's quantizer", "imatrix": "llama.cpp's quantizer + imatrix", "gptq": "ours, GPTQ",
              "best": "ours, GPTAQ + Astro"}


def render_gguf(rows: list[dict]) -> str:
    """Every bench_gguf.py row: llama.cpp's perplexity, ours in PyTorch, size, speed, time."""
    by = _latest(rows)
    quiet = by.get("decode", {}).get("decode_tok_s", {})  # one idle sitting's speeds, when measured
    for name, r in by.items():
        key = "f16" if name == "fp16" else name
        if key in quiet:
            r["decode_tok_s"] = quiet[key]
    lines = ["| GGUF type | quantized by | perplexity in llama.cpp | ours in PyTorch (same weights) | file MiB | "
             "decode tok/s (llama.cpp, 2 threads) | quantization s |", "|---|---|---|---|---|---|---|"]
    if "fp16" in by:
        r = by["fp16"]
        lines.append(f"| F16 | (our export) | {r['llamacpp_ppl']:.2f} | | {r['file_mib']:.1f} | {r['decode_tok_s']:.1f} | |")
    for t in ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        for kind, label in GGUF_KINDS.items():
            r = by.get(f"{kind}-{t}")
            if r is None:
                continue
            torch_ppl = f"{r['torch_ppl']:.2f} ({r['ppl_gap']:+.2%})" if "torch_ppl" in r else ""
            lines.append(f"| {t} | {label} | {r['llamacpp_ppl']:.2f} | {torch_ppl} | {r['file_mib']:.1f} | "
                         f"{r['decode_tok_s']:.1f} | {r.get('quant_seconds', '')} |")
    if "torch-int4" in by:
        lines.append(f"| (W4 g64 packed, PyTorch int4 path, bf16) | ours | | | | {by['torch-int4']['decode_tok_s']:.1f} | |")
    return "\n".join(lines)


def render_gguf_summary(rows: list[dict]) -> str:
    """The README's short version: llama.cpp's perplexity per type and quantizer, and the file sizes of
    the type (one where every quantizer's file has the same size to 0.1 MiB)."""
    by = _latest(rows)
    lines = ["| GGUF type | file MiB | " + " | ".join(GGUF_KINDS.values()) + " |", "|---" * (len(GGUF_KINDS) + 2) + "|"]
    for t in ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        made = [by[f"{k}-{t}"] for k in GGUF_KINDS if f"{k}-{t}" in by]
        if made:
            sizes = {f"{r['file_mib']:.1f}" for r in made}
            cells = [f"{by[f'{k}-{t}']['llamacpp_ppl']:.2f}" if f"{k}-{t}" in by else "" for k in GGUF_KINDS]
            lines.append(f"| {t} | {' / '.join(sorted(sizes))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _family_checks(r: dict) -> str:
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


def _refusal(outcome: str) -> str:
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


def _kept(r: dict) -> str:
    routers = {x.rsplit(".", 1)[-1] for m in r["methods"].values() for x in m["routers"]}
    return f"routers ({', '.join(f'`{x}`' for x in sorted(routers))})" if routers else "nothing"


def render_families(rows: list[dict]) -> str:
    """docs/families.md: one row per family of the matrix."""
    lines = ["| family | class | packed Linears | quantized whole (gptq, gptaq) | kept in full precision | "
             "transforms (rotate · scale · adaptive) |", "|---" * 6 + "|"]
    for r in rows:
        said = [_refusal(o) for o in r["transforms"].values()]
        transforms = f"{said[0]} (all three)" if len(set(said)) == 1 and said[0] != "exact" else " · ".join(said)
        lines.append(f"| {r['label']} | `{r['model_class']}` | {r['methods']['gptq']['packed']} | {_family_checks(r)} | "
                     f"{_kept(r)} | {transforms} |")
    first = rows[0]
    lines += ["", f"transformers {first['transformers']}, torch {first['torch']}; "
              f"{len(rows)} families, {sum(r['seconds'] for r in rows):.0f} s in all."]
    return "\n".join(lines)


def _transforms_in_short(t: dict) -> str:
    """'all exact', or which transforms fold and why the others are refused."""
    if all(o == "exact" for o in t.values()):
        return "all exact"
    why = sorted({"post-norms" if "post-norm" in _refusal(o) else _refusal(o).removeprefix("refused: ")
                  for o in t.values() if o != "exact"})
    exact = [x for x in t if t[x] == "exact"]
    refused = [x for x in t if t[x] != "exact"]
    return (f"{', '.join(exact)} exact; " if exact else "") + f"{', '.join(refused)} refused ({'; '.join(why)})"


def render_families_summary(rows: list[dict]) -> str:
    """The README's short version: families grouped by what stays in full precision and what the
    transforms do."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        key = (_family_checks(r), "routers" if r["methods"]["gptq"]["routers"] else "nothing",
               _transforms_in_short(r["transforms"]))
        groups.setdefault(key, []).append(r["label"])
    lines = ["| families | quantized whole, reload identical | kept in full precision | transforms |", "|---|---|---|---|"]
    for (checks, kept, transforms), labels in groups.items():
        lines.append(f"| {', '.join(labels)} | {checks} | {kept} | {transforms} |")
    return "\n".join(lines)


def render_offload(r: dict) -> str:
    """The disk-offload calibration run against the unconstrained one (bench_offload.py)."""
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    off, full = r["offloaded"], r["unconstrained"]
    return "\n".join([
        "| run | placement | peak RSS above baseline | wall time |", "|---|---|---|---|",
        f"| `device_map=\"auto\", max_memory={{\"cpu\": \"{r['cap_bytes'] // 10**6}MB\"}}` + offload_folder | "
        f"{', '.join(off['placement'])} | {mb(off['peak_rss_above_base'])} | {off['seconds']:.0f} s |",
        f"| no device map (all in memory) | {', '.join(full['placement'])} | {mb(full['peak_rss_above_base'])} | "
        f"{full['seconds']:.0f} s |",
        "",
        f"Model {mb(r['model_bytes'])} ({r['model_over_cap']}× the cap); one block {mb(r['block_bytes'])}; its "
        f"activations {mb(r['activation_bytes'])} (hidden states in/out, the MLP activation, and down_proj's "
        f"Hessian with the two factors of its size that inverting it needs). Offloaded peak / (block + "
        f"activations) = **{r['peak_over_block_plus_activations']}** (counting one Hessian only: "
        f"{r['peak_over_block_plus_activations_one_hessian']}). Checkpoints bit-identical: "
        f"**{r['checkpoints_bit_identical']}** ({r['tensors_compared']} tensors). {r['calibration']}.",
    ])


def render_preconditioning(rows: list[dict], astro: dict | None, astro_beta: dict | None = None) -> str:
    """Each preconditioning row against plain GPTQ with the same grid options (same sitting)."""
    def key(r):
        return (r.get("bits"), r.get("group_size"), bool(r.get("desc_act")), bool(r.get("mse")))

    rows = list({r["row"]: r for r in rows}.values())  # a rerun of a row replaces it
    rows.sort(key=lambda r: -r["bits"])  # widest first; file order within a width
    base = {key(r): r for r in rows if r.get("method", "gptq") == "gptq" and not r.get("astro")
            and r.get("transform", "none") == "none"}
    lines = ["| method | preconditioning | bits | group | WikiText-2 ppl | vs same GPTQ | quantize s | × GPTQ time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reshape = ("Astro" + (f" β={r['astro_beta']}" if r.get("astro_beta", 1.0) != 1.0 else "")) if r.get("astro") else ""
        pre = [p for p in (reshape, r.get("transform", "none")) if p and p != "none"]
        b = base.get(key(r))
        vs = f"{100 * (r['ppl'] / b['ppl'] - 1):+.1f} %" if b and b is not r else ""
        same_sitting = b is not None and b is not r and b.get("sitting") == r.get("sitting")
        tx = f"{r['quant_seconds'] / b['quant_seconds']:.2f}" if same_sitting else ""
        secs = f"{r['quant_seconds']}" + (f" ({r['sitting']})" if r.get("sitting") else "")
        lines.append(f"| {describe(r)} | {' + '.join(pre) or 'none'} | {r['bits']} | {r.get('group_size', '')} | "
                     f"{r['ppl']:.2f} | {vs} | {secs} | {tx} |")
    if astro:
        abl = "; ".join(f"{g} grid: " + ", ".join(f"{k} {v}" for k, v in a.items())
                        for g, a in astro["ablation_error_vs_gptq"].items())
        lines += ["", f"Astro alone (`bench_astro.py`, {astro['bits']} bits g{astro['group_size']} defaults): the reshaped "
                  f"full-precision model's perplexity {astro['reshaped_fp_ppl']} against {astro['fp_ppl']} "
                  f"({astro['ppl_change_percent']:+.2f} %); reshaping every Linear took {astro['reshape_seconds']} s. "
                  f"Solved-layer error after Astro then GPTQ, over GPTQ's own, on the Linears of blocks "
                  f"{', '.join(map(str, astro['ablation_blocks']))}: {abl}."]
    if astro_beta:
        by = "; ".join(f"β = {b}: {v['reshaped_fp_ppl']} ({v['ppl_change_percent']:+.2f} %)"
                       for b, v in astro_beta["by_beta"].items())
        lines += ["", f"The reshaped full-precision model's perplexity by β (`bench_astro.py --betas`, "
                  f"{astro_beta['bits']} bits g{astro_beta['group_size']}; unreshaped {astro_beta['fp_ppl']}): {by}."]
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_rows(path: Path) -> list[dict]:
    """read_jsonl, each row tagged with its sitting where the file is named for one (`NAME-s6`)."""
    sitting = re.fullmatch(r".*-(s\d+)", path.stem)
    rows = read_jsonl(path)
    return [{**r, "sitting": sitting.group(1)} for r in rows] if sitting else rows


PRESETS_START, PRESETS_END = "<!-- presets:start -->", "<!-- presets:end -->"
# where a preset's row is looked up, first match wins: the timed sittings first
PRESET_SOURCES = ("peers.jsonl", "ablation-s5.jsonl", "preconditioning.jsonl", "ablation-s6.jsonl", "ablation-s4.jsonl")
DEFAULTS = RESULTS / "defaults.jsonl"  # bench_quality.py defaults-w* rows against round-to-nearest, by seed
DEFAULTS_START, DEFAULTS_END = "<!-- defaults:start -->", "<!-- defaults:end -->"
OPTIONS_START, OPTIONS_END = "<!-- options:start -->", "<!-- options:end -->"
OPTIONS_DETAIL_START, OPTIONS_DETAIL_END = "<!-- options-detail:start -->", "<!-- options-detail:end -->"


def render_presets() -> str:
    from hf_astroquant.config import AstroQuantConfig
    from hf_astroquant.presets import PRESETS

    REFINE_LR = AstroQuantConfig.option("refine_lr").default  # noqa: N806

    found: dict[str, tuple[dict, str]] = {}
    for name in reversed(PRESET_SOURCES):  # the first source overwrites the later ones
        path = RESULTS / name
        for r in read_jsonl(path) if path.exists() else []:
            if r.get("refine_lr", REFINE_LR) == REFINE_LR:  # a learning-rate ablation is not the preset
                found[r.get("row")] = (r, name)
    lines = ["| preset | bits | group | method | preconditioning | WikiText-2 ppl | quantize s | measured as |",
             "|---|---|---|---|---|---|---|---|"]
    for (quality, bits), (opts, row) in sorted(PRESETS.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "fast",
                                                                               kv[0][0] != "balanced")):
        r, source = found[row]
        pre = " + ".join(x for x in (opts.get("transform"), "Astro" if opts.get("astro") else None,
                                     {"down": "online down_proj rotation (transformers only)",
                                      "writers": "online o_proj + down_proj rotation (transformers only)"}
                                     .get(opts.get("online_rotation", "none"))) if x) or "none"
        method = opts["method"] + (f" + {opts['refine_steps']} refine steps" if opts.get("refine_steps") else "")
        method += " (scales + rounding)" if opts.get("refine_rounding_lr") else ""
        method += f", damping {opts['damp_percent']}" if "damp_percent" in opts else ""
        lines.append(f"| `{quality}` | {bits} | {opts['group_size']} | {method} | {pre} | {r['ppl']:.2f} | "
                     f"{r['quant_seconds']} | `{row}` ({source}) |")
    return "\n".join(lines)


def render_defaults(rows: list[dict]) -> str:
    """Perplexity of every option at its default (bits and group size set) against round-to-nearest, per
    calibration seed."""
    by = {(r["row"], r.get("calibration_seed", 0)): r for r in rows}
    seeds = sorted({s for _, s in by})
    lines = ["| bits | group | " + " | ".join(f"defaults, calibration seed {s}" for s in seeds) + " | round-to-nearest "
             "(min/max, its default) | round-to-nearest with the clipping search | plain GPTQ (the old defaults), "
             "on the same windows |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for bits in (4, 3):
        cells = [f"{by[(f'defaults-w{bits}', s)]['ppl']:.2f}" if (f"defaults-w{bits}", s) in by else "" for s in seeds]
        rtn = [by.get((f"rtn-w{bits}", 0)), by.get((f"rtn-mse-w{bits}", 0))]
        plain = [f"{by[(f'gptq-w{bits}-plain', s)]['ppl']:.2f} (seed {s})" for s in seeds
                 if (f"gptq-w{bits}-plain", s) in by]
        lines.append(f"| {bits} | 64 | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r['ppl']:.2f}" if r else "" for r in rtn) + f" | {' / '.join(plain)} |")
    return "\n".join(lines)


def main() -> None:
    from hf_astroquant.options import options_table

    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {f: f.read_text() for f in files}

    def put(start: str, end: str, body: str) -> None:
        homes = [f for f, t in texts.items() if start in t]
        if len(homes) != 1:
            raise SystemExit(f"{start} is in {len(homes)} files ({[str(f) for f in homes]}); it must be in one")
        texts[homes[0]] = _replace(texts[homes[0]], start, end, body)

    main_table = render(load_rows())
    put(START, END, main_table)
    put(OPTIONS_START, OPTIONS_END, options_table())
    put(OPTIONS_DETAIL_START, OPTIONS_DETAIL_END, options_table(detail=True))
    put(PRESETS_START, PRESETS_END, render_presets())
    if DEFAULTS.exists():
        put(DEFAULTS_START, DEFAULTS_END, render_defaults(read_jsonl(DEFAULTS)))
    sections = [(ABLATION, ABL_START, ABL_END, render_ablation), (ABLATION_PPL, ABL2_START, ABL2_END, render_ablation_ppl),
                (SPEED, SPEED_START, SPEED_END, render_speed), (EXPORT, EXPORT_START, EXPORT_END, render_export),
                (VLLM, VLLM_START, VLLM_END, render_vllm),
                (VLLM, VLLM_SUMMARY_START, VLLM_SUMMARY_END, render_vllm_summary),
                (GGUF, GGUF_START, GGUF_END, render_gguf), (GGUF, GGUF_SUMMARY_START, GGUF_SUMMARY_END, render_gguf_summary),
                (PEERS, PEERS_START, PEERS_END, render_peers),
                (PEERS, PEERS_SUMMARY_START, PEERS_SUMMARY_END, render_peers_summary),
                (SEEDS, SEEDS_START, SEEDS_END, render_seeds), (SEEDS, SEEDS_SUMMARY_START, SEEDS_SUMMARY_END, render_seeds_summary),
                (FAMILIES, FAMILIES_START, FAMILIES_END, render_families),
                (FAMILIES, FAMILIES_SUMMARY_START, FAMILIES_SUMMARY_END, render_families_summary)]
    for paths, start, end, render_rows in sections:
        paths = [p for p in paths if p.exists()]
        if paths:
            table = render_rows([r for p in paths for r in read_rows(p)])
            put(start, end, table)
            print(table)
    if PRECONDITIONING.exists():
        later = read_rows(PRECONDITIONING_LATER) if PRECONDITIONING_LATER.exists() else []
        table = render_preconditioning(read_rows(PRECONDITIONING) + later,
                                       json.loads(ASTRO.read_text()) if ASTRO.exists() else None,
                                       json.loads(ASTRO_BETA.read_text()) if ASTRO_BETA.exists() else None)
        put(PRE_START, PRE_END, table)
        print(table)
    if OFFLOAD.exists():
        table = render_offload(json.loads(OFFLOAD.read_text()))
        put(OFFLOAD_START, OFFLOAD_END, table)
        print(table)
    if MOE_MEMORY.exists():
        import bench_moe_memory

        table = bench_moe_memory.render(json.loads(MOE_MEMORY.read_text()))
        put(bench_moe_memory.START, bench_moe_memory.END, table)
        print(table)
    if MOE_OPTIONS.exists():
        import bench_moe_options

        table = bench_moe_options.summary(json.loads(MOE_OPTIONS.read_text()))
        put("<!-- moe_options:start -->", "<!-- moe_options:end -->", table)
        print(table)
    if FP_STREAM.exists():
        import bench_fp_stream

        table = bench_fp_stream.render(json.loads(FP_STREAM.read_text()))
        put(bench_fp_stream.START, bench_fp_stream.END, table)
        print(table)
    for f, t in texts.items():
        if f.read_text() != t:
            f.write_text(t)
            print(f"rendered {f.relative_to(ROOT)}")
    print(main_table)


if __name__ == "__main__":
    main()
