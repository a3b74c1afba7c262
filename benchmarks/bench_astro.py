"""Astro on SmolLM2-135M without the pipeline: what the reshaping alone does.

    python benchmarks/bench_astro.py   # a note under the table `preconditioning` (benchmarks/results/rows.jsonl)

1. The reshaped full-precision model: H of every Linear from the full-precision model on the
   protocol's calibration windows, every Linear reshaped with Astro's defaults for 3 bits g64
   asymmetric, then WikiText-2 perplexity (8 windows of 2048) against the untouched model.
2. The regularizer ablation on the Linears of blocks 1, 16 and 29: the output error
   tr(ΔW·H·ΔWᵀ) left after GPTQ of Astro's reshaped weights, measured against the original W,
   over GPTQ's own error, for our predicted-error penalty (β, steps) and for the published
   summary's linear activation-weighted one; under the recommended grid (act-order, static
   groups, clipping search) and under plain GPTQ.

With `--betas`, part 1 is repeated for each β (from the original weights each time) and part 2
is left out: the reshaped full-precision model's perplexity change as a function of β.

    python benchmarks/bench_astro.py --betas 1 0.5 0.25 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

ABLATION_BLOCKS = (1, 16, 29)
# (penalty, β, FISTA steps)
PENALTIES = [("predicted", 1.0, 25), ("predicted", 0.5, 25), ("predicted", 1.0, 50), ("paper", 0.1, 25),
             ("paper", 0.01, 25)]
GRIDS = {"recommended": dict(desc_act=True, static_groups=True, mse=True), "plain": {}}


def note_row(r: dict, **kw) -> dict:
    """The result as a note under the preconditioning table (a row of results_rows with a "note")."""
    if "by_beta" in r:
        by = "; ".join(f"β = {b}: {v['reshaped_fp_ppl']} ({v['ppl_change_percent']:+.2f} %)" for b, v in r["by_beta"].items())
        note = (f"The reshaped full-precision model's perplexity by β (`bench_astro.py --betas`, {r['bits']} bits "
                f"g{r['group_size']}; unreshaped {r['fp_ppl']}): {by}.")
        return results_rows.row("preconditioning", "astro-beta", {**r, "note": note}, **kw)
    abl = "; ".join(f"{g} grid: " + ", ".join(f"{k} {v}" for k, v in a.items()) for g, a in r["ablation_error_vs_gptq"].items())
    note = (f"Astro alone (`bench_astro.py`, {r['bits']} bits g{r['group_size']} defaults): the reshaped full-precision "
            f"model's perplexity {r['reshaped_fp_ppl']} against {r['fp_ppl']} ({r['ppl_change_percent']:+.2f} %); "
            f"reshaping every Linear took {r['reshape_seconds']} s. Solved-layer error after Astro then GPTQ, over "
            f"GPTQ's own, on the Linears of blocks {', '.join(map(str, r['ablation_blocks']))}: {abl}.")
    return results_rows.row("preconditioning", "astro", {**r, "note": note}, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--betas", type=float, nargs="+", help="only part 1, once per β")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_astroquant.algorithms.astro import astro_reshape
    from hf_astroquant.algorithms.gptq import gptq_quantize, reconstruction_error
    from hf_astroquant.eval import perplexity

    ckpt = protocol.smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    windows = protocol.calibration_windows(tok)
    test_ids = protocol.wikitext_test_ids(tok)
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    sums: dict[str, list] = {}

    def hook(name):
        def fn(module, a):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            s = sums.setdefault(name, [0, 0])
            s[0] = s[0] + x.t() @ x
            s[1] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            model(windows[i:i + 8])
    for h in handles:
        h.remove()
    hessians = {n: 2 * s / k for n, (s, k) in sums.items()}
    sums.clear()
    result: dict = {"bits": args.bits, "group_size": 64, "calibration": "Python docs 64x512"}
    result["fp_ppl"] = round(perplexity(model, test_ids, 2048, 8), 3)
    originals = {name: lin.weight.detach().clone() for name, lin in linears.items()}

    def reshaped_model(**astro) -> dict:
        """Reshape every Linear from its original weights, then the model's perplexity."""
        start = time.perf_counter()
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.copy_(astro_reshape(originals[name], hessians[name], group_size=64, bits=args.bits,
                                               **astro))
        seconds = round(time.perf_counter() - start, 1)
        ppl = round(perplexity(model, test_ids, 2048, 8), 3)
        return {"reshaped_fp_ppl": ppl, "reshape_seconds": seconds,
                "ppl_change_percent": round(100 * (ppl / result["fp_ppl"] - 1), 3)}

    if args.betas:
        result["by_beta"] = {}
        for beta in args.betas:
            result["by_beta"][str(beta)] = reshaped_model(beta=beta)
            print(beta, result["by_beta"][str(beta)], flush=True)
        results_rows.append_rows([note_row(result)])
        return

    # 2. ablation (before the weights are reshaped in place)
    names = [f"{p}-beta{b}-steps{k}" for p, b, k in PENALTIES]
    ablation = {g: {n: [0.0, 0.0] for n in names} for g in GRIDS}
    gptq_total = dict.fromkeys(GRIDS, 0.0)
    for name, lin in linears.items():
        if int(name.split(".")[0]) not in ABLATION_BLOCKS:
            continue
        W, H = lin.weight.detach().float(), hessians[name]
        reshaped = [astro_reshape(W, H, beta=b, steps=k, group_size=64, bits=args.bits, penalty=p)
                    for p, b, k in PENALTIES]
        for g, opts in GRIDS.items():
            grid = dict(bits=args.bits, group_size=64, **opts)
            gptq_total[g] += reconstruction_error(W, gptq_quantize(W, H, **grid).weight, H)
            for n, Wp in zip(names, reshaped):
                ablation[g][n][0] += reconstruction_error(W, gptq_quantize(Wp, H, **grid).weight, H)
                ablation[g][n][1] += reconstruction_error(W, Wp, H)
    result["ablation_blocks"] = list(ABLATION_BLOCKS)
    result["ablation_error_vs_gptq"] = {g: {k: round(v[0] / gptq_total[g], 4) for k, v in a.items()}
                                        for g, a in ablation.items()}
    result["ablation_reshape_error_vs_gptq"] = {g: {k: round(v[1] / gptq_total[g], 4) for k, v in a.items()}
                                                for g, a in ablation.items()}

    # 1. reshape every Linear with the defaults, then perplexity
    result.update(reshaped_model())
    results_rows.append_rows([note_row(result)])


if __name__ == "__main__":
    main()
