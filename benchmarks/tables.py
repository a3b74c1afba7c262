"""The table specs of update_readme.py: for each marker of README.md and docs/*.md, the tables of
benchmarks/results/rows.jsonl it shows, which of their rows, in what order, its columns (header, cell)
and their formatting. Cells read a row's columns and its sitting, label and table; derived columns
(× GPTQ time, × fp32) divide by the baseline rows the spec names, so a rerun of either updates them.
"""

from __future__ import annotations

from typing import Callable

from update_readme import Table, cell, first, mb, times, versus

OURS, PPL, METHOD = "hf_astroquant", ("WikiText-2 ppl", cell("ppl", ".2f")), ("method", cell("name"))
BITS, GROUP = ("bits", cell("bits")), ("group", cell("group_size"))
DOMAIN = {"out": "Python docs 64x512", "in": "WikiText-2 valid 64x512"}
PHASES = [(f"{k.replace('_', ' ')} s", lambda r, k=k: r.get("phase_seconds", {}).get(k, ""))
          for k in ("solve", "statistics", "fp_stream", "other")]


def same_sitting_gptq(r: dict, b: dict) -> bool:
    """Ablation: b is plain GPTQ at r's width in r's sitting."""
    return (b.get("method", "gptq") == "gptq" and not b.get("asym_alpha") and b.get("rounding", "gptq") == "gptq"
            and (b["sitting"], b["bits"]) == (r["sitting"], r["bits"]))


def same_gptq(r: dict, b: dict) -> bool:
    """Preconditioning: b is plain GPTQ with r's grid (another row than r)."""
    key = lambda x: (x["bits"], x.get("group_size"), bool(x.get("desc_act")), bool(x.get("mse")))  # noqa: E731
    return (b is not r and key(b) == key(r) and b.get("method", "gptq") == "gptq" and not b.get("astro")
            and b.get("transform", "none") == "none")


def precond_seconds(r: dict) -> str:
    """The seconds, with the sitting where its GPTQ ran in another (so no × GPTQ time)."""
    base = [b for b in r["_all"] if same_gptq(r, b)]
    return f"{r['quant_seconds']}" + (f" ({r['sitting']})" if base and base[-1]["sitting"] != r["sitting"] else "")


def fp32_of(r: dict, b: dict) -> bool:
    return (b["model"], b["variant"], b["dtype"]) == (r["model"], "fp", "fp32")


def shared(rows: list[dict]) -> list[str]:
    """Why rows ran on a shared machine (their times overstated), in the peers table's order."""
    why = [r.get("machine_shared") for r in sorted(rows, key=lambda r: (-r["bits"], r["ppl"]))]
    return [s for i, s in enumerate(why) if s and s not in why[:i]]


def marked_seconds(r: dict) -> str:
    """The seconds, with one star per reason the machine was shared (the note under the table)."""
    why = r.get("machine_shared")
    return f"{r['quant_seconds']}" + ("*" * (shared(r["_all"]).index(why) + 1) if why else "")


def presets() -> dict:
    """bench_quality row: (quality, bits, options) of the preset it measured."""
    from hf_astroquant.presets import PRESETS

    return {row: (quality, bits, opts) for (quality, bits), (opts, row) in PRESETS.items()}


def preset(g: list[dict], part: int, fn: Callable = lambda x: x) -> str:
    return fn(presets()[g[0]["label"]][part])


def preset_method(o: dict) -> str:
    return (o["method"] + (f" + {o['refine_steps']} refine steps" if o.get("refine_steps") else "")
            + " (scales + rounding)" * bool(o.get("refine_rounding_lr"))
            + (f", damping {o['damp_percent']}" if "damp_percent" in o else ""))


def preset_preconditioning(o: dict) -> str:
    online = {"down": "online down_proj rotation", "writers": "online o_proj + down_proj rotation"}
    online = online.get(o.get("online_rotation", "none"))
    transform = {"auto": "rotate (scale on post-norm families)"}.get(o.get("transform"), o.get("transform"))
    return " + ".join(x for x in (transform, "Astro" * bool(o.get("astro")),
                                  online and f"{online} (transformers only)") if x) or "none"


def best_or_all(r: dict) -> bool:
    """Peers summary: ours only as the `best` preset's row where the peers sitting ran it (alone, if rerun alone)."""
    best = [b for b in r["_all"] if presets().get(b["label"], ("",))[0] == "best"]
    best = [b for b in best if not (b.get("machine_shared") and any(
        x["label"] == b["label"] and not x.get("machine_shared") for x in best))]
    return r["tool"] != OURS or r in best or not any(b["bits"] == r["bits"] for b in best)


def peer_cell(tool: str) -> Callable:
    def f(g):
        b = min((r for r in g if r["tool"].split()[0] == tool), key=lambda r: r["ppl"], default=None)
        return "not run" if b is None else (f"{b['ppl']:.2f} · {b['quant_seconds']:.0f} s"
                                            f"{'*' * bool(b.get('machine_shared'))} · {b['peak_rss_gib']:.1f} GiB")
    return f


def seed_key(r: dict) -> tuple:
    return r["configuration"], r["bits"], r["group_size"]


def studied(r: dict) -> bool:
    """A configuration the seed study ran at a seed it set (or at another damping beside it)."""
    return seed_key(r) in {seed_key(b) for b in r["_all"] if {"transform_seed", "seed", "dampening_frac"} & b.keys()}


def seeds(g: list[dict]) -> list[tuple[str, float]]:
    """(seed, ppl) of a configuration's runs; a row without a seed ran at its default (its first run counts)."""
    runs: dict = {}
    for r in g:
        runs.setdefault(str(r["transform_seed"]) if "transform_seed" in r else str(r.get("seed", 0))
                        if r["tool"] == OURS else "default", r["ppl"])
    return sorted(runs.items())


def spread(g: list[dict]) -> tuple[str, str]:
    ppl = [p for _, p in seeds(g)]
    return f"{sum(ppl) / len(ppl):.2f}", f"{min(ppl):.2f}-{max(ppl):.2f}"


def seeds_summary(groups: list[list[dict]]) -> str:
    parts = []
    for r, g in ((g[0], g) for g in groups if len(seeds(g)) >= 3):
        label = (f"hf_astroquant `{'best' if presets().get(r['row'], ('',))[0] == 'best' else r['row']}`"
                 if r["tool"] == OURS else r["tool"] + {"quip": " + QuIP", "spinquant": " + SpinQuant"}.get(
                     r.get("transform"), ""))
        mean, low_high = spread(g)
        parts.append(f"{label} at damping {r.get('damp_percent', r.get('dampening_frac', 0.01))}: {mean} "
                     f"({low_high}, {len(seeds(g))} seeds)")
    return ("W4 across the random rotations' seeds, mean (range): " + "; ".join(parts)
            + " ([docs/results.md](docs/results.md#w4-how-much-is-the-draw-of-the-random-rotations)).")


def defaults_columns(rows: list[dict]) -> list:
    runs = sorted({r.get("calibration_seed", 0) for r in rows})

    def at(name: str, seed: int = 0, then: str = "") -> Callable:
        return lambda g: next((f"{r['ppl']:.2f}{then}" for r in reversed(g) if r["row"] == name.format(
            b=g[0]["bits"]) and r.get("calibration_seed", 0) == seed), "")
    return ([("bits", first("bits")), ("group", first("group_size"))]
            + [(f"defaults, calibration seed {s}", at("defaults-w{b}", s)) for s in runs]
            + [("round-to-nearest (min/max, its default)", at("rtn-w{b}")),
               ("round-to-nearest with the clipping search", at("rtn-mse-w{b}")),
               ("plain GPTQ (the old defaults), on the same windows", lambda g: " / ".join(
                   x for x in (at("gptq-w{b}-plain", s, f" (seed {s})")(g) for s in runs) if x))])


GGUF_KINDS = {"llamacpp": "llama.cpp's quantizer", "imatrix": "llama.cpp's quantizer + imatrix", "gptq": "ours, GPTQ",
              "best": "ours, GPTAQ + Astro", "preset": "ours, `--preset best`"}
GGUF_ROWS = ["fp16"] + [f"{k}-{t}" for t in ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K") for k in GGUF_KINDS] + ["torch-int4"]
GGUF_NAMES = {"fp16": ("F16", "(our export)"), "torch-int4": ("(W4 g64 packed, PyTorch int4 path, bf16)", "ours")}


def moe_cell(bits: int, seed: int) -> Callable:
    def f(g):
        r = next((r for r in reversed(g) if (r["bits"], r["calibration_seed"]) == (bits, seed)), None)
        fallback = f" ({r['experts_fallback']} rounded)" if r and r.get("experts_fallback") else ""
        return "" if r is None else f"{r['ppl']:.2f}{fallback}"
    return f


SECTIONS = {
    "results": Table(("defaults", "results"), [
        METHOD, ("bits", lambda r: "fp32" if r["bits"] == 32 else r["bits"]), GROUP, PPL,
        ("quantize s", cell("quant_seconds")), ("peak RSS GiB", cell("peak_rss_gib")),
        ("checkpoint / fp16 linears", cell("checkpoint_ratio_vs_fp16")),
        ("calibration", lambda r: "" if r.get("method") == "rtn" or r["bits"] == 32 else DOMAIN.get(r.get("domain"), ""))],
        order=lambda r: (-r["bits"], r["tool"] != OURS, r["ppl"])),
    "defaults": Table(("defaults",), defaults_columns, group=lambda r: r["bits"], order=lambda r: -r["bits"]),
    "presets": Table(("peers", "ablation", "preconditioning"), [  # a row name in several tables: the first one's
        ("preset", lambda g: preset(g, 0, lambda q: f"`{q}`")), ("bits", first("bits")),
        ("group", lambda g: preset(g, 2, lambda o: o["group_size"])), ("method", lambda g: preset(g, 2, preset_method)),
        ("preconditioning", lambda g: preset(g, 2, preset_preconditioning)), ("WikiText-2 ppl", first("ppl", ".2f")),
        ("quantize s", first("quant_seconds")), ("measured as", lambda g: f"`{g[0]['label']}` ({g[0]['table']} table)")],
        where=lambda r: r["label"] in presets(), group=lambda r: r["label"], notes=False,
        order=lambda r: (-r["bits"], preset([r], 0) != "fast", preset([r], 0) != "balanced")),
    "ablation": Table(("ablation",), [
        METHOD, BITS, GROUP, PPL, ("sitting", cell("sitting")), ("quantize s", cell("quant_seconds")),
        ("× GPTQ time", times("quant_seconds", same_sitting_gptq)), *PHASES, ("peak RSS GiB", cell("peak_rss_gib")),
        ("× GPTQ RSS", times("peak_rss_gib", same_sitting_gptq)), ("fp stream GiB", cell("fp_stream_gib")),
        ("median α", cell("asym_alpha_median"))], order=lambda r: (-r["bits"], r["ppl"], r["sitting"])),
    "ablation-ppl": Table(("ablation-ppl",), [METHOD, BITS, GROUP, PPL, ("fp stream GiB", cell("fp_stream_gib")),
                                              ("median α", cell("asym_alpha_median"))], order=lambda r: (-r["bits"], r["ppl"])),
    "preconditioning": Table(("preconditioning",), [
        METHOD, ("preconditioning", cell("preconditioning")), BITS, GROUP, PPL,
        ("vs same GPTQ", lambda r: "" if versus("ppl", same_gptq)(r) is None else
         f"{100 * (versus('ppl', same_gptq)(r) - 1):+.1f} %"),
        ("quantize s", precond_seconds),
        ("× GPTQ time", times("quant_seconds", lambda r, b: same_gptq(r, b) and b["sitting"] == r["sitting"]))],
        order=lambda r: -r["bits"]),
    "peers": Table(("peers",), [
        ("tool and configuration", cell("configuration")), BITS, GROUP, PPL,
        ("quantize s", marked_seconds),
        ("peak RSS GiB", cell("peak_rss_gib"))], order=lambda r: (-r["bits"], r["ppl"]),
        note=lambda rows: shared(rows) and "Time overstated: the machine was shared (" + "; ".join(
            f"{'*' * (i + 1)} {why}" for i, why in enumerate(shared(rows))) + ")."),
    "peers-summary": Table(("peers",), lambda rows: [("bits, group", lambda g: f"W{g[0]['bits']} g{g[0]['group_size']}")]
                           + [(t, peer_cell(t)) for t in sorted({r["tool"].split()[0] for r in rows},
                                                                key=lambda t: (t != OURS, t))],
                           where=best_or_all, order=lambda r: -r["bits"], group=lambda r: r["bits"]),
    "seeds": Table(("peers", "seeds"), [
        ("tool and configuration", first("configuration")), ("bits", first("bits")), ("group", first("group_size")),
        ("ppl at each seed", lambda g: ", ".join(f"{p:.2f} ({s})" for s, p in seeds(g))),
        ("mean", lambda g: spread(g)[0]), ("min-max", lambda g: spread(g)[1])],
        where=studied, order=lambda r: (-r["bits"], r["configuration"]), group=seed_key),
    "seeds-summary": Table(("peers", "seeds"), [], where=studied, order=lambda r: (-r["bits"], r["configuration"]),
                           group=seed_key, text=seeds_summary),
    "speed": Table(("speed",), [
        ("model", cell("model")), ("weights", lambda r: "full precision" if r["variant"] == "fp" else
                                   f"{r['variant'][1:]}-bit g64"), ("activations", cell("dtype")),
        ("forward path", lambda r: "" if r["variant"] == "fp" else "/".join(r.get("active_backends", []))),
        ("decode tok/s (batch 1)", cell("decode_tok_s")), ("× fp32", times("decode_tok_s", fp32_of)),
        ("prefill tok/s", lambda r: f"{r['prefill_tok_s']} ({r['prefill_shape']})"),
        ("× fp32", times("prefill_tok_s", fp32_of)), ("checkpoint GiB", cell("checkpoint_gib")),
        ("peak RSS after load GiB", cell("load_peak_rss_gib")), ("peak RSS GiB", cell("peak_rss_gib"))]),
    "export": Table(("export",), [
        ("config", cell("config")), ("format", cell("format")),
        ("GPTQModel (fp16) vs ours (fp16)", cell("gptqmodel_vs_ours_fp16", ".2e")),
        ("GPTQModel (fp16) vs exact", cell("gptqmodel_vs_truth", ".2e")),
        ("ours (fp16) vs exact", cell("ours_fp16_vs_truth", ".2e"))]),
    "vllm": Table(("vllm",), [
        ("config", cell("config")), ("export", cell("format")), ("tokens", cell("tokens")),
        ("ours (fp32)", cell("ours_fp32", ".3f")), ("ours (fp16)", cell("ours_fp16", ".3f")),
        ("vLLM (fp16)", cell("vllm_fp16", ".3f")), ("vLLM vs ours (fp32)", cell("vllm_vs_ours_fp32", "+.2%")),
        ("vLLM kernel", cell("vllm_kernel")),
        ("HTTP server", lambda r: f"answered ({r['server_seconds_to_start']:.0f} s to start)" if r.get("server_text")
         else "not run" if r.get("server_text") is None else "empty answer")]),
    "vllm-summary": Table(("vllm",), [
        ("checkpoint", cell("checkpoint")), ("export", cell("format")),
        ("perplexity, ours (fp32)", cell("ours_fp32", ".2f")),
        ("in vLLM (fp16)", lambda r: f"{r['vllm_fp16']:.2f} ({r['vllm_vs_ours_fp32']:+.2%})")]),
    "gguf": Table(("gguf",), [
        ("GGUF type", lambda r: GGUF_NAMES.get(r["label"], (r.get("gguf_type"),))[0]),
        ("quantized by", lambda r: GGUF_NAMES.get(r["label"], ("", GGUF_KINDS.get(r["label"].split("-")[0])))[1]),
        ("perplexity in llama.cpp", cell("llamacpp_ppl", ".2f")),
        ("ours in PyTorch (same weights)", lambda r: f"{r['torch_ppl']:.2f} ({r['ppl_gap']:+.2%})" if "torch_ppl" in r else ""),
        ("file MiB", cell("file_mib", ".1f")), ("decode tok/s (llama.cpp, 2 threads)", cell("decode_tok_s", ".1f")),
        ("quantization s", cell("quant_seconds"))],
        where=lambda r: r["label"] in GGUF_ROWS, order=lambda r: GGUF_ROWS.index(r["label"])),
    "gguf-summary": Table(("gguf",), [
        ("GGUF type", first("gguf_type")), ("file MiB", lambda g: " / ".join(sorted({f"{r['file_mib']:.1f}" for r in g})))]
        + [(name, lambda g, k=k: next((f"{r['llamacpp_ppl']:.2f}" for r in g if r["label"].startswith(f"{k}-")), ""))
           for k, name in GGUF_KINDS.items()],
        where=lambda r: r["label"] in GGUF_ROWS[1:-1], order=lambda r: GGUF_ROWS.index(r["label"]),
        group=lambda r: r["gguf_type"]),
    "families": Table(("families",), [
        ("family", cell("name")), ("class", lambda r: f"`{r['model_class']}`"),
        ("packed Linears", lambda r: r["methods"]["gptq"]["packed"]), ("quantized whole (gptq, gptaq)", cell("checks")),
        ("kept in full precision", cell("kept")), ("transforms (rotate · scale · adaptive)", cell("transforms_cell"))],
        note=lambda rows: f"transformers {rows[0]['transformers']}, torch {rows[0]['torch']}; {len(rows)} families, "
                          f"{sum(r['seconds'] for r in rows):.0f} s in all."),
    "families-summary": Table(("families",), [
        ("families", lambda g: ", ".join(r["name"] for r in g)), ("quantized whole, reload identical", first("checks")),
        ("kept in full precision", first("kept_short")), ("transforms", first("transforms_short"))],
        group=lambda r: (r["checks"], r["kept_short"], r["transforms_short"])),
    "offload": Table(("offload",), [
        ("run", cell("run")), ("placement", lambda r: ", ".join(r["placement"])),
        ("peak RSS above baseline", lambda r: mb(r["peak_rss_above_base"])), ("wall time", lambda r: f"{r['seconds']:.0f} s")]),
    "moe_memory": (Table(("moe_memory",), [
        ("run", cell("run")), ("placement", lambda r: ", ".join(r["placement"])),
        ("peak RSS above baseline: loading", lambda r: mb(r["load_peak_above_base"])),
        ("calibration", lambda r: f"**{mb(r['calibration_peak_above_base'])}**"),
        ("calibration wall time (all)", lambda r: f"{r['calibration_seconds']:.0f} s ({r['seconds']:.0f} s)")]),
        Table(("moe_memory-components",), [("component", cell("component")),
                                           ("bytes", lambda r: " ".join(x for x in (mb(r["bytes"]), r["also"]) if x))])),
    "moe_options": Table(("moe_options",), lambda rows: [("setting", first("setting"))] + [
        (f"W{b} g64, seed {s}", moe_cell(b, s))
        for b, s in sorted({(r["bits"], r["calibration_seed"]) for r in rows}, key=lambda c: (-c[0], c[1]))],
        where=lambda r: r.get("setting"), group=lambda r: r["setting"]),
    "distributed": Table(("distributed",), [
        ("method", cell("method")), ("statistics", cell("statistics_dtype")), ("ranks", cell("ranks")),
        ("s per block (median)", cell("block_seconds")), ("× 1 rank", lambda r: f"{r['speedup']:.2f}"),
        ("statistics s", cell("statistics_seconds")), ("solve s", cell("solve_seconds")),
        ("summed MiB per block", cell("reduced_mb_per_block")), ("sent MiB per block", cell("broadcast_mb_per_block")),
        ("codes as 1 rank", lambda r: f"{100 * r['codes_as_1_rank']:.3f} %")]),
    "fp_stream": Table(("fp_stream",), [
        ("full-precision inputs", cell("inputs")), ("stream MiB", lambda r: f"{r['fp_stream_bytes'] / 2**20:.0f}"),
        ("full-precision forwards s", cell("fp_stream_seconds")), ("quantize s", cell("seconds")),
        ("peak RSS above the model MiB", cell("peak_rss_above_model_mb"))]),
}
