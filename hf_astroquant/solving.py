"""One Linear's solve inside the pipeline: from its statistics to its packed layer, recorded in the report."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from .algorithms import solve_linear
from .algorithms.factors import HessianFactors
from .algorithms.gptq import reconstruction_error
from .algorithms.output_error import output_error
from .algorithms.solve import SolverOptions
from .config import AstroQuantConfig
from .experts import BlockExperts
from .memory import trim_heap
from .modules import QuantLinear, make_layer
from .online_rotation import candidate_rotations, input_rotation_of, reattach, rebased
from .report import QuantizationReport
from .statistics import Stats

logger = logging.getLogger("hf_astroquant")


class LayerSolver:
    """Solves one Linear from its Hessian and replaces its weight by the quantized value."""

    def __init__(self, cfg: AstroQuantConfig, report: QuantizationReport):
        self.cfg, self.report = cfg, report
        # refine_rounding_lr tunes each code from how near its rounding was: the solves keep that
        self.options = dataclasses.replace(cfg.solver_options(), keep_rounding_error=cfg.refine_rounding_lr > 0)
        self.packed: dict[str, QuantLinear] = {}
        self.rounding_errors: dict[str, torch.Tensor] = {}  # (out, in) per solved layer, with the option
        self.experts: BlockExperts | None = None  # the block's experts, when it has any

    def round_to_nearest(self, name: str, linear: nn.Linear, stats: "Stats | None") -> None:
        """The stated fallback for an expert that saw fewer than min_expert_tokens tokens: round to
        nearest (no error correction from a Hessian of a handful of tokens), recorded in the report."""
        W = linear.weight.data
        result, packed = rounded_layer(self.cfg, name, linear, mse=False)
        self.report.expert_fallback[name] = stats.n if stats is not None else 0
        if stats is not None:
            self.report.layer_errors[name] = reconstruction_error(W, result.weight, stats.normalize().h)
        set_weight(linear, result.weight)
        packed.set_backend("reference")
        self.packed[name] = packed

    def __call__(self, name: str, linear: nn.Linear, stats: Stats, device: torch.device | None = None,
                 factors: HessianFactors | None = None) -> None:
        """Solve `linear` (on `device` when given: its weight and statistics are copied there and
        the result comes back to the Linear's device). `factors`: the factorizations of the stage's
        H (on `device`), shared by the Linears that have this H (`stage_factors`)."""
        with self.report.timing("solve"):
            self._solve(name, linear, stats, device, factors)

    def _solve(self, name: str, linear: nn.Linear, stats: Stats, device: torch.device | None,
               factors: HessianFactors | None) -> None:
        if self.experts is not None and name in self.experts and stats.n < self.cfg.min_expert_tokens:
            return self.round_to_nearest(name, linear, stats)
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
        rotation = input_rotation_of(linear)
        if rotation is not None and self.cfg.rotation_candidates > 1:
            W, H, result, alpha = self._solve_best_rotation(name, linear, rotation, W, D, G, factors, opts)
        else:
            result, alpha = _solved(name, W, H, opts, D, G, factors)
        err = reconstruction_error(W, result.weight, H)
        self.report.layer_errors[name] = err
        self.report.damping[name] = result.damp_percent
        if self.options.needs_fp_stream:
            self.report.asym_alpha[name] = alpha
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
        self.packed[name] = packed
        if result.rounding_error is not None:
            self.rounding_errors[name] = result.rounding_error
        del result
        trim_heap()

    def _solve_best_rotation(self, name, linear, current, W, D, G, factors, opts):
        """rotation_candidates: solve `linear` in the input basis of each candidate rotation and keep the
        solution with the smallest error on the full-precision output (algorithms/output_error.py); the
        Linear reads its input through the chosen rotation from here on. Returns (W, H, result, alpha)
        in the chosen basis. `current`: the rotation the Linear reads through now."""
        device = factors.hessian.device
        home = current if current.signs.device == device else copy.deepcopy(current).to(device)
        best = None
        for c, rotation in enumerate(candidate_rotations(home, name, self.cfg.seed, self.cfg.rotation_candidates)):
            if c:
                Wc, Dc, Gc = rebased(W, home, rotation), *(None if t is None else rebased(t, home, rotation, True)
                                                          for t in (D, G))
                fc = HessianFactors(rebased(factors.hessian, home, rotation, True), self.cfg.damp_percent)
            else:
                Wc, Dc, Gc, fc = W, D, G, factors
            result, alpha = _solved(name, Wc, fc.hessian, opts, Dc, Gc, fc)
            err = output_error(Wc, result.weight, fc.hessian, Dc, alpha)
            if best is None or err < best[0]:
                best = (err, c, rotation, Wc, fc.hessian, result, alpha)
            del result
        _, c, rotation, Wc, H, result, alpha = best
        self.report.rotation_choice[name] = c
        if c:
            reattach(linear, rotation.to(linear.weight.device))
        return Wc, H, result, alpha


def _solved(name: str, W, H, opts, D, G, factors):
    try:
        return solve_linear(W, H, opts, D, G, factors)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


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
