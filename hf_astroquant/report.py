"""What a calibration run did: the report (for logs, model cards and tests), its timed phases,
and the part of it a resume checkpoint carries."""

from __future__ import annotations

import time
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
    routers: list[str] = field(default_factory=list)  # MoE routers: kept in full precision
    input_rotated: list[str] = field(default_factory=list)  # online_rotation: layers that rotate their input
    # rotation_candidates: per rotated layer, the candidate kept (0: the width's shared rotation)
    rotation_choice: dict[str, int] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # per experts module: tokens routed to each
    # expert Linears rounded to nearest instead of solved: tokens they saw (< min_expert_tokens; 0: never reached)
    expert_fallback: dict[str, int] = field(default_factory=dict)
    # where the seconds went: the PHASES, and "other" (the blocks' forward passes, bookkeeping)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # refine_steps: per block, the output loss [with the solved scales, with the tuned ones]
    refine_loss: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def timing(self, phase: str):
        """Add the wall time of a `with` block to phase_seconds[phase]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

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
                  "refine_loss", "rotation_choice")


def report_state(report: QuantizationReport) -> dict:
    return {k: getattr(report, k) for k in _REPORT_FIELDS}


def restore_report(report: QuantizationReport, state: dict) -> float:
    """Put a checkpointed report back; return the seconds the earlier runs took."""
    for k in _REPORT_FIELDS:
        if k in state:
            setattr(report, k, state[k])
    return float(state.get("seconds", 0.0))
