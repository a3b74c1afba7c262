"""One Linear's solve: from its statistics to its packed layer and the record of how it went.

Nothing here writes to a shared object: `LayerSolver` returns a `SolvedLayer`, and the block step
(block_solve.py) and the driver (pipeline.py) pass it on.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from .algorithms import solve_linear
from .algorithms.factors import HessianFactors
from .algorithms.gptq import reconstruction_error
from .algorithms.solve import SolverOptions
from .config import AstroQuantConfig
from .memory import trim_heap
from .modules import QuantLinear, make_layer
from .online_rotation import input_rotation_of
from .statistics import Stats

logger = logging.getLogger("hf_astroquant")


@dataclasses.dataclass
class SolvedLayer:
    """A solved Linear: its packed layer (on the reference forward path: the values the solve chose,
    computed as F.linear computes them) and what the report records of it."""

    layer: QuantLinear
    error: float | None  # relative reconstruction error on the calibration inputs (None: no data to weigh it)
    damp_percent: float | None = None  # the damping the solve needed
    asym_alpha: float | None = None  # the interpolation α (asymmetric solvers)
    fallback_tokens: int | None = None  # rounded to nearest for too few routed tokens: the tokens it saw
    rounding_error: torch.Tensor | None = None  # (out, in): how near each rounding was (refine_rounding_lr)


Timing = Callable[[str], object]  # phase name -> a context manager that adds the wall time to that phase


def _untimed(phase: str):
    return nullcontext()


class LayerSolver:
    """Solves one Linear from its statistics: gives the Linear the quantized weight (so the rest of the
    block's forward sees it) and returns the `SolvedLayer`."""

    def __init__(self, cfg: AstroQuantConfig, timing: Timing = _untimed,
                 before_solve: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None):
        """`timing`: where the solves' time goes (QuantizationReport.timing); `before_solve(name, W, H, D)`:
        told the exact inputs of every solve (the block loop's listeners, pipeline.py)."""
        self.cfg, self.timing, self.before_solve = cfg, timing, before_solve
        # refine_rounding_lr tunes each code from how near its rounding was: the solves keep that
        self.options = dataclasses.replace(cfg.solver_options(), keep_rounding_error=cfg.refine_rounding_lr > 0)

    def round_to_nearest(self, name: str, linear: nn.Linear, stats: Stats | None) -> SolvedLayer:
        """The stated fallback for an expert that saw fewer than min_expert_tokens tokens: round to
        nearest (no error correction from a Hessian of a handful of tokens). Timed as a solve."""
        with self.timing("solve"):
            W = linear.weight.data
            result, packed = rounded_layer(self.cfg, name, linear, mse=False)
            error = reconstruction_error(W, result.weight, stats.normalize().h) if stats is not None else None
            set_weight(linear, result.weight)
            packed.set_backend("reference")
            return SolvedLayer(packed, error, fallback_tokens=stats.n if stats is not None else 0)

    def __call__(self, name: str, linear: nn.Linear, stats: Stats, device: torch.device | None = None,
                 factors: HessianFactors | None = None) -> SolvedLayer:
        """Solve `linear` (on `device` when given: its weight and statistics are copied there and
        the result comes back to the Linear's device). `factors`: the factorizations of the stage's
        H (on `device`), shared by the Linears that have this H (`stage_factors`)."""
        with self.timing("solve"):
            return self._solve(name, linear, stats, device, factors)

    def _solve(self, name: str, linear: nn.Linear, stats: Stats, device: torch.device | None,
               factors: HessianFactors | None) -> SolvedLayer:
        W = linear.weight.data
        check_finite_weights(name, W)
        home = W.device
        factors = factors or stage_factors(stats, device or home, self.cfg.damp_percent)
        H, D, G = factors.hessian, stats.d, stats.g
        if H.device != home:
            W = W.to(H.device)
            D = D.to(H.device) if D is not None else None
            G = G.to(H.device) if G is not None else None
        opts = dataclasses.replace(self.options, tensor_type=self.cfg.tensor_type_of(name))
        if self.before_solve is not None:
            self.before_solve(name, W, H, D)
        try:
            result, alpha = solve_linear(W, H, opts, D, G, factors)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        err = reconstruction_error(W, result.weight, H)
        logger.debug("%s: relative reconstruction error %.3e (damp %.3g, asym alpha %.3g)", name, err,
                     result.damp_percent, alpha)
        if result.weight.device != home:
            result = dataclasses.replace(result, **{f.name: getattr(result, f.name).to(home)
                                                    for f in dataclasses.fields(result)
                                                    if isinstance(getattr(result, f.name), torch.Tensor)})
        set_weight(linear, result.weight)
        # Packed now, so a block holds its packed layers rather than full-size codes and weights.
        # The reference path computes F.linear with exactly these de-quantized values, so a forward
        # through the packed layer gives the same outputs as the Linear; a kernel might not.
        packed = make_layer(result, self.cfg, linear.bias, input_rotation_of(linear))
        packed.set_backend("reference")
        solved = SolvedLayer(packed, err, result.damp_percent, alpha if self.options.needs_fp_stream else None,
                             rounding_error=result.rounding_error)
        del result
        trim_heap()
        return solved


def rounded_layer(cfg: AstroQuantConfig, name: str, linear: nn.Linear, mse: bool):
    """(round-to-nearest result, its packed layer) for the Linear `name` on the configured grid."""
    check_finite_weights(name, linear.weight.data)
    opts = SolverOptions(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, mse=mse, method="rtn",
                         tensor_type=cfg.tensor_type_of(name))
    result, _ = solve_linear(linear.weight.data, None, opts)
    return result, make_layer(result, cfg, linear.bias, input_rotation_of(linear))


def stage_factors(stats: Stats, device: torch.device, damp_percent: float) -> HessianFactors:
    """The shared factorizations of a stage's normalized H, on `device` (H is copied there when it
    lives elsewhere: once per device, not once per Linear)."""
    H = stats.normalize().h
    return HessianFactors(H if H.device == device else H.to(device), damp_percent)


def set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Give `linear` the quantized `weight` as a new tensor: the original one is left as it was, for a
    full-precision forward that still needs it (stream.StagewiseFpInputs)."""
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()


def check_finite_weights(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"weights of {name} contain NaN or Inf; cannot quantize")
