"""Which weight matrices of the decoder blocks a run left in full precision, and how much of each
block they are: MoE expert tensors, routers, excluded or untileable Linears. Nothing stays in full
precision unannounced."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger("hf_astroquant")


def full_precision_weights(blocks: dict[str, nn.Module], packed_types: tuple[type, ...]) -> dict[str, dict[str, float]]:
    """{block name: {parameter name: its share of the block's weight elements}} for every floating-point
    parameter of two or more dimensions (a weight matrix, or a stack of them such as an MoE's experts)
    inside a block (`blocks`: name → block) and outside a packed layer (`packed_types`); blocks with
    none are left out. A packed layer counts in its block's total as in_features × out_features
    elements; vectors (norms, biases) count in neither."""
    found: dict[str, dict[str, float]] = {}
    for bname, block in blocks.items():
        packed = {n: m for n, m in block.named_modules() if isinstance(m, packed_types)}
        total = sum(m.in_features * m.out_features for m in packed.values())
        left = {f"{bname}.{pname}": p.numel() for pname, p in block.named_parameters()
                if p.dim() >= 2 and p.is_floating_point() and not _inside(pname, packed)}
        total += sum(left.values())
        if left:
            found[bname] = {name: n / total for name, n in left.items()}
    return found


def outside_blocks(model: nn.Module, block_list: str) -> dict[str, int]:
    """{module name: weight elements} of the modules beside the decoder blocks that hold weight matrices
    (the embedding, the output head, a multimodal model's vision tower and projector): each child of an
    ancestor of `block_list` (e.g. "model.language_model.layers") that does not contain the blocks.
    These are never quantized; the report records them."""
    parts = block_list.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts))]  # "", "model", "model.language_model"
    found = {}
    for ancestor in ancestors:
        for child, module in model.get_submodule(ancestor).named_children():
            name = f"{ancestor}.{child}" if ancestor else child
            if name in ancestors or name == block_list:
                continue
            n = sum(p.numel() for p in module.parameters() if p.dim() >= 2 and p.is_floating_point())
            if n:
                found[name] = n
    return found


def _inside(param: str, modules) -> bool:
    return any(param.startswith(m + ".") for m in modules)


def warn_full_precision(found: dict[str, dict[str, float]], n_blocks: int) -> None:
    """One warning naming what stayed in full precision (the largest share first), if anything did."""
    ranked = sorted(((name, share) for shares in found.values() for name, share in shares.items()),
                    key=lambda kv: (-kv[1], kv[0]))
    if not ranked:
        return
    shown = ", ".join(f"{name} ({share:.1%} of its block)" for name, share in ranked[:6])
    more = f" and {len(ranked) - 6} more" if len(ranked) > 6 else ""
    logger.warning("astroquant: %d weight tensor(s) in %d of the %d decoder blocks are left in full precision: "
                   "%s%s (listed in the quantization report and the model card)", len(ranked), len(found), n_blocks,
                   shown, more)


def summary(found: dict[str, dict[str, float]]) -> str:
    """One line for the model card: how many tensors, and the largest share of one block they take."""
    if not found:
        return "none"
    count = sum(len(s) for s in found.values())
    worst = max(sum(s.values()) for s in found.values())
    return f"{count} tensor(s), up to {worst:.1%} of a block's weights (listed in astroquant_report.json)"


def experts_summary(report: dict) -> str:
    """One line for the card and the CLI: experts per layer, the calibration tokens each saw, the
    fallbacks and the routers kept in full precision."""
    counts = [c for per_layer in report["expert_tokens"].values() for c in per_layer]
    fallback = report.get("expert_fallback") or {}
    layers = len(report["expert_tokens"])
    return (f"{layers} MoE layer(s), {len(counts) // max(layers, 1)} experts each; {min(counts)} to {max(counts)} "
            "calibration tokens routed to an expert; "
            f"{len(fallback)} expert Linear(s) rounded to nearest for too few tokens; "
            f"{len(report.get('routers') or [])} router(s) in full precision (all in astroquant_report.json)")
