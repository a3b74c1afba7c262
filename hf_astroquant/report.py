"""What a calibration run did, in one place: the report the block loop feeds from what each step
returns (`QuantizationReport`), its timed phases, the part of it a resume checkpoint carries, and
the JSON run record saved beside the weights (`run_record`, plus `measurements_record` for what the
workflows measure around a run: perplexity, lm-eval, peak memory, the source model)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

@dataclass
class QuantizationReport:
    """What a calibration run did, for logs, model cards and tests."""

    layer_errors: dict[str, float] = field(default_factory=dict)  # relative; what of: layer_error_kind
    # "output": tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration inputs; "weight": ‖ΔW‖²/‖W‖² (round-to-nearest
    # sees no data, so it has no H to weigh the error with)
    layer_error_kind: str = "output"
    damping: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # targets never called in a forward pass
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    asym_alpha: dict[str, float] = field(default_factory=dict)  # interpolation α used per layer (asymmetric runs)
    fp_stream_bytes: int = 0  # peak bytes held for the full-precision stream (block inputs, outputs and X̃)
    resumed_blocks: int = 0  # blocks taken from a resume_dir checkpoint instead of calibrated
    transforms: dict[str, Any] = field(default_factory=dict)  # what transform= folded, per site
    # options fitted to the model: {option: {"asked", "chose", "why"}} (transform="auto"; a preset's
    # online_rotation on a model with nothing to rotate)
    choices: dict[str, dict[str, str]] = field(default_factory=dict)
    routers: list[str] = field(default_factory=list)  # MoE routers: kept in full precision
    input_rotated: list[str] = field(default_factory=list)  # online_rotation: layers that rotate their input
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # per experts module: tokens routed to each
    # expert Linears rounded to nearest instead of solved: tokens they saw (< min_expert_tokens; 0: never reached)
    expert_fallback: dict[str, int] = field(default_factory=dict)
    # where the seconds went: the PHASES, and "other" (the blocks' forward passes, bookkeeping)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # refine_steps: per block, the output loss [with the solved scales, with the tuned ones]
    refine_loss: dict[str, list[float]] = field(default_factory=dict)
    # under torch.distributed: {"world_size", "reduced_bytes", "broadcast_bytes"} (this rank's view)
    distributed: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def timing(self, phase: str):
        """Add the wall time of a `with` block to phase_seconds[phase]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    def add_layer(self, name: str, solved) -> None:
        """Record a solved Linear (layer_solve.SolvedLayer)."""
        if solved.fallback_tokens is not None:
            self.expert_fallback[name] = solved.fallback_tokens
        if solved.error is not None:
            self.layer_errors[name] = solved.error
        if solved.damp_percent is not None:
            self.damping[name] = solved.damp_percent
        if solved.asym_alpha is not None:
            self.asym_alpha[name] = solved.asym_alpha

    def add_block(self, name: str, result) -> None:
        """Record what a block's calibration made (block_solve.BlockResult)."""
        for lname, solved in result.solved.items():
            self.add_layer(lname, solved)
        self.skipped.extend(result.unreached)
        self.expert_tokens.update(result.expert_tokens)
        if result.refine_loss is not None:
            self.refine_loss[name] = list(result.refine_loss)
        self.fp_stream_bytes = max(self.fp_stream_bytes, result.fp_stream_bytes)

    def close_phases(self) -> None:
        """Put what no phase claimed under "other" (the phases are disjoint parts of `seconds`)."""
        named = sum(v for k, v in self.phase_seconds.items() if k != "other")
        self.phase_seconds["other"] = max(0.0, self.seconds - named)


# The timed parts of a calibration run (QuantizationReport.phase_seconds); disjoint.
PHASES = (
    "preconditioning",  # transform=: the residual rotation; the scale search with its extra forward per block
    "fp_stream",  # the full-precision block forward that gives X̃ (asymmetric solvers, stream_fp)
    "statistics",  # H = 2·X·Xᵀ/N, and D (and G) against X̃, from every Linear's input
    "solve",  # per Linear: Astro, the interpolation α, the layer solver, its packing
    "refine",  # refine_steps: the scale tuning's steps, and the block forward that measures them
)


_REPORT_FIELDS = ("layer_errors", "layer_error_kind", "damping", "skipped", "asym_alpha", "fp_stream_bytes", "seconds", "phase_seconds",
                  "refine_loss")


def report_state(report: QuantizationReport) -> dict:
    return {k: getattr(report, k) for k in _REPORT_FIELDS}


def restore_report(report: QuantizationReport, state: dict) -> float:
    """Put a checkpointed report back; return the seconds the earlier runs took."""
    for k in _REPORT_FIELDS:
        if k in state:
            setattr(report, k, state[k])
    return float(state.get("seconds", 0.0))


def run_record(model, report: QuantizationReport) -> dict:
    """The JSON-safe run record that save_pretrained writes next to the weights (astroquant_report.json)
    and the card reads: what the run did (`report`) and what the quantized `model` holds, including
    the weights left in full precision (warned about here). The CLI adds its measurements to it."""
    from . import full_precision
    from .blocks import find_blocks
    from .export.hub import base_model_info
    from .modules import QUANTIZED_LAYERS

    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    packed = sum(sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n != "bias") for m in layers)
    fp16 = sum(m.in_features * m.out_features * 2 for m in layers)
    device = next((p.device.type for p in model.parameters()), "cpu")
    record = base_model_info(getattr(model, "name_or_path", None))
    record.update({
        "seconds": round(report.seconds, 2), "device": device, "layer_errors": dict(report.layer_errors),
        "layer_error_kind": report.layer_error_kind, "calibration": report.calibration or None,
        "skipped": list(report.skipped), "quantized_packed_bytes": packed, "quantized_fp16_bytes": fp16,
    })
    if report.expert_tokens:
        record.update(routers=list(report.routers), expert_tokens=dict(report.expert_tokens),
                      expert_fallback=dict(report.expert_fallback))
    if report.phase_seconds:
        record["phase_seconds"] = {k: round(v, 2) for k, v in report.phase_seconds.items()}
    if report.asym_alpha:
        record["asym_alpha"] = dict(report.asym_alpha)
    if report.choices:
        record["choices"] = {k: dict(v) for k, v in report.choices.items()}
    record["world_size"] = int(report.distributed.get("world_size", 1))
    if report.distributed:
        record["distributed"] = dict(report.distributed)
    block_name, blocks = find_blocks(model)
    left = full_precision.full_precision_weights({f"{block_name}.{i}": b for i, b in enumerate(blocks)}, QUANTIZED_LAYERS)
    full_precision.warn_full_precision(left, len(blocks))
    record["full_precision_weights"] = left
    record["full_precision_outside_blocks"] = full_precision.outside_blocks(model, block_name)
    return record


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measurements_record(report: Mapping[str, Any] | None, *, source: Mapping[str, Any] | None = None,
                        base_model: str | None = None, license: str | None = None,  # noqa: A002 (the card's key)
                        perplexity: dict | None = None, lm_eval: dict | None = None,
                        peak_memory: bool = False) -> dict[str, Any]:
    """A copy of a run's `astroquant_report` with what the workflows measured around it: the source
    model's info (`resolve_source`'s, its unknown values left out), the card's base_model and license
    when given, the perplexity and lm-eval records, and with `peak_memory` this process's peak RSS
    (and CUDA memory, where there is CUDA)."""
    out = dict(report or {})
    out.update({k: v for k, v in (source or {}).items() if v is not None})
    for key, value in (("base_model", base_model), ("license", license)):
        if value:
            out[key] = value
    if perplexity is not None:
        out["perplexity"] = perplexity
    if lm_eval is not None:
        out["lm_eval"] = lm_eval
    if peak_memory:
        import torch

        out["peak_rss_bytes"] = _peak_rss_bytes()
        if torch.cuda.is_available():
            out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out
