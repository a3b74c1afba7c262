"""calibrate_all_experts and min_expert_tokens measured on a small *trained* Qwen3-MoE (issue 21).

    nice -n 5 python benchmarks/bench_moe_options.py --threads 1 --seeds 0 1 --all-min-tokens 16 256

No real MoE checkpoint is reachable offline and a random-init MoE gives meaningless perplexities,
so the first run trains one (deterministic: fixed seeds, one torch thread, 700 steps of one
2048-token window each; about 22 minutes on the shared 2-core machine) and keeps it under
~/.cache/hf_astroquant/ (ASTROQUANT_CACHE); later runs reuse it. Each run is a row of the table `moe_options`
of benchmarks/results/rows.jsonl (results_rows.py); runs already there are not run again.

- Model: Qwen3MoeForCausalLM, hidden 192, 4 layers, 4 heads / 2 KV heads (head_dim 48), 16 experts
  top-2 (norm_topk_prob), moe_intermediate 192, tied embeddings, SmolLM2 tokenizer (vocab 49152).
- Training text: WikiText-2 validation (the tokenized release) and the Python docs, both from
  ../shared/data, with every calibration window this script can draw cut out (16 x 512 and 64 x 512
  windows, seeds 0-2, both domains). WikiText-2 test (evaluation) is never seen. There is no
  WikiText-2 train split in ../shared/data. Windows of 2048 tokens (the evaluation window), batch 1,
  AdamW, the LM loss on 512 random positions per window (the output layer dominates the compute)
  plus the router's load-balancing loss (coefficient 0.05) over every position.
- Quantization: the protocol's grid (asymmetric, group 64, damping 0.01), method gptq with every
  other option at its default, and rtn; calibration windows from protocol.calibration_windows
  (out-of-domain Python docs by default) but 16 x 512 instead of 64 x 512, so experts see fewer tokens.
- Each row: WikiText-2 test perplexity (protocol windows of 2048 tokens, the first --ppl-windows),
  quantization wall time (the report's seconds), the calibration tokens routed to each expert
  (min/median/max over all layers' experts) and the experts rounded to nearest for too few tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
import results_rows  # noqa: E402

SEQ = 2048  # training window = evaluation window (a model trained shorter would extrapolate RoPE)
MODEL = dict(vocab_size=49152, hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=48, moe_intermediate_size=192, num_experts=16, num_experts_per_tok=2,
             norm_topk_prob=True, router_aux_loss_coef=0.05, tie_word_embeddings=True, max_position_embeddings=SEQ,
             rope_theta=10000.0)
# threads=1: on the shared 2-core machine two threads ran 2.4x slower than one (11.5 against 4.8 s per
# step beside two other 2-thread jobs); a fixed count keeps the run deterministic either way
# targets: the LM loss on that many random positions of each window (the 49152-way output layer is
# ~85% of the compute; fewer targets buy more steps at the full 2048-token context)
TRAIN = dict(steps=700, lr=3e-3, warmup=30, min_lr_ratio=0.1, weight_decay=0.1, seed=0, clip=1.0, threads=1,
             targets=512)
# calibration windows cut out of the training text: (windows, seqlen, seed) for both domains
HELD_OUT = [(n, 512, s) for n in (16, 64) for s in (0, 1, 2)]
NAME = "moe-qwen3-trained-h192-l4-e16k2-v2-fp32"
BASE = dict(group_size=64, sym=False, damp_percent=0.01)  # the protocol's grid; gptq's other options: defaults


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(protocol.smollm2_gguf_dir(), gguf_file=protocol.GGUF_NAME)


def domain_ids(tok, domain: str) -> torch.Tensor:
    """The calibration text of a domain tokenized exactly as protocol.calibration_windows does."""
    rel = {"out": "pydocs/python-docs.txt", "in": "wikitext2/wiki.valid.tokens"}[domain]
    return tok(protocol.read_text(rel), return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]


def held_out_mask(tok, domain: str, ids: torch.Tensor) -> torch.Tensor:
    """True at every token position some calibration window of HELD_OUT covers (checked against the
    protocol's own windows, so the training text provably excludes them)."""
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    for n, seqlen, seed in HELD_OUT:
        gen = torch.Generator().manual_seed(seed)  # as hf_astroquant.calibration.sample_windows draws
        starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen).tolist()
        windows = protocol.calibration_windows(tok, domain, n, seqlen, seed)
        assert all(torch.equal(ids[s:s + seqlen], w) for s, w in zip(starts, windows)), "window positions differ"
        for s in starts:
            mask[s:s + seqlen] = True
    return mask


def training_segments(tok) -> tuple[list[torch.Tensor], dict]:
    """Runs of training text at least SEQ + 1 tokens long, outside every held-out window."""
    segments, info = [], {}
    for domain in ("in", "out"):
        ids = domain_ids(tok, domain)
        mask = held_out_mask(tok, domain, ids)
        edges = torch.diff(torch.cat([torch.tensor([1]), mask.int(), torch.tensor([1])])).tolist()
        starts = [i for i, d in enumerate(edges) if d == -1]
        ends = [i for i, d in enumerate(edges) if d == 1]
        kept = [ids[a:b] for a, b in zip(starts, ends) if b - a > SEQ]
        segments += kept
        info[domain] = dict(tokens=ids.numel(), held_out=int(mask.sum()), trainable=sum(k.numel() for k in kept))
    return segments, info


def batches(segments: list[torch.Tensor], steps: int, seed: int):
    """`steps` windows of SEQ tokens, a segment drawn by its number of start positions."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([float(s.numel() - SEQ) for s in segments])
    for _ in range(steps):
        seg = segments[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, seg.numel() - SEQ, (1,), generator=gen))
        yield seg[start:start + SEQ].unsqueeze(0)


def lr_at(step: int) -> float:
    t = TRAIN
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    progress = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_loss(model, window: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss on TRAIN["targets"] random positions of `window`, load-balancing loss over all)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    out = model.model(input_ids=window, output_router_logits=True)
    pos = torch.randperm(window.shape[1] - 1, generator=gen)[:TRAIN["targets"]]
    logits = model.lm_head(out.last_hidden_state[0, pos])
    lm = torch.nn.functional.cross_entropy(logits, window[0, pos + 1])
    aux = load_balancing_loss_func(out.router_logits, MODEL["num_experts"], MODEL["num_experts_per_tok"])
    return lm, aux


def train(tok, out: Path) -> None:
    """Train the MoE (LM loss + load-balancing loss) and save it with its tokenizer under `out`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hf_astroquant.file_modes import apply_umask, written_since

    torch.set_num_threads(TRAIN["threads"])
    torch.manual_seed(TRAIN["seed"])
    segments, data_info = training_segments(tok)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))
    log, start, gen = [], time.perf_counter(), torch.Generator().manual_seed(TRAIN["seed"] + 1)
    model.train()
    for step, window in enumerate(batches(segments, TRAIN["steps"], TRAIN["seed"])):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        lm, aux = step_loss(model, window, gen)
        (lm + MODEL["router_aux_loss_coef"] * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append((step, round(float(lm.detach()), 4), round(float(aux.detach()), 4)))
        if step % 20 == 0 or step == TRAIN["steps"] - 1:
            print(f"step {step:4d} lm {log[-1][1]:.3f} aux {log[-1][2]:.3f} {time.perf_counter() - start:.0f}s",
                  flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = dict(model=MODEL, train=TRAIN, held_out=HELD_OUT, data=data_info, windows_seen=TRAIN["steps"],
                seconds=round(time.perf_counter() - start), loss_log=log, torch_threads=torch.get_num_threads())
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    apply_umask(written_since(tmp, {}))  # a fresh folder: every file in it is ours
    tmp.rename(out)


def trained_model(tok) -> str:
    out = protocol.CACHE / NAME
    if not (out / "training.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        train(tok, out)
    return str(out)


@torch.no_grad()
def routing_share(model, windows: torch.Tensor) -> dict:
    """Share of the top-k assignments each expert gets on `windows`, per layer: min/max and the
    normalized entropy (1 = perfectly even, 0 = one expert)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    counts: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        counts.append(torch.bincount(out[2].reshape(-1), minlength=MODEL["num_experts"]))

    routers = [m for m in model.modules() if isinstance(m, Qwen3MoeTopKRouter)]
    handles = [r.register_forward_hook(hook) for r in routers]
    for w in windows:
        model(input_ids=w.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    layers = len(routers)
    per_layer = [sum(counts[i::layers]).float() for i in range(layers)]
    result = []
    for c in per_layer:
        p = c / c.sum()
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p)))
        result.append(dict(min_share=round(float(p.min()), 4), max_share=round(float(p.max()), 4),
                           entropy=round(ent, 3)))
    return {"per_layer": result, "even_share": round(1 / MODEL["num_experts"], 4)}


def rows(bits_list, mins, all_mins) -> dict[str, dict]:
    """name: AstroQuantConfig options, per bit width: rtn, then gptq over both experts options."""
    out = {}
    for bits in bits_list:
        out[f"rtn-w{bits}"] = dict(bits=bits, method="rtn", **BASE)
        for all_experts, values in ((False, mins), (True, all_mins)):
            for m in values:
                name = f"gptq-w{bits}-{'all' if all_experts else 'routed'}-min{m}"
                out[name] = dict(bits=bits, method="gptq", calibrate_all_experts=all_experts, min_expert_tokens=m,
                                 **BASE)
    return out


def expert_stats(record: dict) -> dict:
    """From the quantization report: calibration tokens routed per expert, and the fallbacks."""
    counts = [c for per_layer in record.get("expert_tokens", {}).values() for c in per_layer]
    fallback = record.get("expert_fallback") or {}
    experts = {name.rsplit(".", 1)[0] for name in fallback}  # …mlp.experts.3.gate_proj -> …mlp.experts.3
    if not counts:
        return {}
    return dict(expert_tokens_min=min(counts), expert_tokens_median=statistics.median(counts),
                expert_tokens_max=max(counts), experts_total=len(counts), experts_fallback=len(experts),
                linears_fallback=len(fallback))


def run_row(name: str, opts: dict | None, ckpt: str, windows: torch.Tensor, test_ids: torch.Tensor,
            n_ppl: int) -> dict:
    import hf_astroquant
    from hf_astroquant.eval import perplexity
    from transformers import AutoModelForCausalLM

    row: dict = {"row": name}
    if opts is None:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    else:
        cfg = hf_astroquant.AstroQuantConfig(dataset=windows, **opts)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=cfg)
        row.update(opts, from_pretrained_seconds=round(time.perf_counter() - start, 1),
                   quant_seconds=round(model.hf_quantizer.report.seconds, 1))
        row.update(expert_stats(model.astroquant_report))
    row["ppl"] = round(perplexity(model, test_ids, SEQ, n_ppl, progress=False), 3)
    del model
    gc.collect()
    return row


def markdown(results: list[dict]) -> str:
    lines = ["| row | calib seed | bits | method | all experts | min tokens | ppl | quant s "
             "| tokens/expert min/med/max | experts rounded (of total) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tokens = (f"{r['expert_tokens_min']}/{r['expert_tokens_median']:g}/{r['expert_tokens_max']}"
                  if "expert_tokens_min" in r else "")
        fb = f"{r['experts_fallback']} ({r['experts_total']})" if "experts_total" in r else ""
        lines.append(f"| {r['row']} | {r.get('calibration_seed', '')} | {r.get('bits', 'fp32')} | "
                     f"{r.get('method', '')} | {r.get('calibrate_all_experts', '')} | "
                     f"{r.get('min_expert_tokens', '')} | {r['ppl']:.3f} | {r.get('quant_seconds', '')} | "
                     f"{tokens} | {fb} |")
    return "\n".join(lines)


SETTINGS = {"rtn": "round to nearest", "routed-min0": "routed, min_expert_tokens 0",
            "routed-min16": "routed, min_expert_tokens 16 (default)", "routed-min64": "routed, min_expert_tokens 64",
            "routed-min256": "routed, min_expert_tokens 256", "all-min16": "calibrate_all_experts=True"}  # the docs'


def label(name: str, seed: int | None, n_calib: int, domain: str) -> str:
    """A run's identity in the table `moe_options`: its row, calibration seed, windows and domain."""
    return name if name == "fp" else " ".join([name, f"calibration-seed={seed}"] + [f"n-calib={n_calib}"] * (
        n_calib != 16) + [f"domain={domain}"] * (domain != "out"))


def table_row(row: dict, **kw) -> dict:
    """A run in the schema of results_rows, with the docs table's name of its setting (`setting`); the fp
    row is the note under the table."""
    columns = dict(row)
    if row["row"] == "fp":
        experts, layers = MODEL["num_experts"], MODEL["num_hidden_layers"]
        columns["note"] = (f"Full precision {row['ppl']:.2f}; {experts * layers} experts in all ({experts} per layer, "
                           f"{layers} layers).")
    elif row.get("n_calib") == 16 and row.get("domain") == "out":
        key = row["row"].split("-", 2)[2] if row["row"].startswith("gptq-") else row["row"].split("-")[0]
        columns["setting"] = SETTINGS.get(key)
    return results_rows.row("moe_options", label(row["row"], row.get("calibration_seed"), row.get("n_calib"),
                                                 row.get("domain")), columns, **kw)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--min-tokens", type=int, nargs="+", default=[0, 16, 64, 256],
                    help="min_expert_tokens values with calibrate_all_experts=False")
    ap.add_argument("--all-min-tokens", type=int, nargs="+", default=[16],
                    help="min_expert_tokens values with calibrate_all_experts=True (every expert then sees every "
                         "token, so the value only matters below the number of calibration tokens)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (0: the protocol's)")
    ap.add_argument("--domain", default="out", choices=["out", "in"])
    ap.add_argument("--n-calib", type=int, default=16, help="calibration windows (the protocol: 64)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test windows of 2048 tokens (147: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for quantization and evaluation")
    ap.add_argument("--only", nargs="*", help="run only these row names")
    return ap.parse_args()


def fp_reference(tok, ckpt: str, test_ids: torch.Tensor, args) -> tuple[dict, dict]:
    """The fp row, and how the fp model routes the evaluation and the calibration tokens."""
    from transformers import AutoModelForCausalLM

    row = run_row("fp", None, ckpt, None, test_ids, args.ppl_windows)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    calib = protocol.calibration_windows(tok, args.domain, args.n_calib, args.seqlen, 0)
    routing = dict(wikitext_test=routing_share(model, test_ids[:args.ppl_windows * SEQ].reshape(-1, SEQ)),
                   calibration=routing_share(model, calib))
    return row, routing


def main() -> None:
    args = parse_args()
    tok = tokenizer()
    ckpt = trained_model(tok)
    torch.set_num_threads(args.threads)
    test_ids = protocol.wikitext_test_ids(tok)
    done = {r["label"] for r in results_rows.read_rows() if r["table"] == "moe_options"}
    if "fp" not in done:
        fp_row, routing = fp_reference(tok, ckpt, test_ids, args)
        training = json.loads((Path(ckpt) / "training.json").read_text())
        training.pop("loss_log")
        results_rows.append_rows([table_row({**fp_row, "routing_fp": routing, "model": NAME, "path": ckpt,
                                             "training": training, "ppl_windows": args.ppl_windows,
                                             "torch": torch.__version__})])
    for seed in args.seeds:
        windows = protocol.calibration_windows(tok, args.domain, args.n_calib, args.seqlen, seed)
        for name, opts in rows(args.bits, args.min_tokens, args.all_min_tokens).items():
            if label(name, seed, args.n_calib, args.domain) in done or (args.only and name not in args.only):
                continue
            row = run_row(name, opts, ckpt, windows, test_ids, args.ppl_windows)
            row.update(calibration_seed=seed, n_calib=args.n_calib, seqlen=args.seqlen, domain=args.domain,
                       threads=args.threads)
            results_rows.append_rows([table_row(row)])
    print(markdown([r["columns"] for r in results_rows.read_rows() if r["table"] == "moe_options"]))


if __name__ == "__main__":
    main()
