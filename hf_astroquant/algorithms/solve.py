"""The layer solver, composed: target × correction × rounding, one registry for every method.

A solve is three independent choices (`Recipe`), each a small function registered below:

    target      what Q·X should match
                symmetric     W·X                        (GPTQ's objective ‖(Q − W)X‖²)
                interpolated  W_ref·X, W_ref = W + α·(W·D)·H⁻¹, the GPTQ form of ‖Q·X − W·X_α‖²
                              (interpolation.py; any rounding can aim at it)
                asymmetric    W·X_α, X_α = X + α·ΔX, carried inside the sweep by GPTAQ's P = f(α·D)
    correction  what the greedy/beam sweep adds to GPTQ's error feedback
                none | gptaq (the P-term with v_i = w_i) | rescomp (P on the original columns,
                plus ResComp's pull α·(W0_i − w_i) toward them: `gptaq.py`, `gptq.py`)
    rounding    greedy (GPTQ's sweep) | beam (bounded search, `beam_width` per row) |
                successive (reverse decoding toward a fixed target) | nearest (no Hessian)

The public options name a recipe (`recipe_of`):

    method="rtn"                        symmetric × none × nearest
    method="gptq"                       symmetric × none, or interpolated when asym_alpha ≠ 0
    method="gptaq"                      asymmetric × gptaq (α = 1 unless asym_alpha says)
    method="rescomp"                    asymmetric × rescomp (symmetric × rescomp at asym_alpha=0:
                                        the paper's "GPTQ+ResComp"; the config refuses it below
                                        3 bits, `config.RESCOMP_MIN_BITS`)
    rounding="gptq" | "beam" | "successive" | (rtn: nearest)

with `astro` reshaping W first (astro.py): every recipe then starts from, and aims at, W′.
The α of X_α (`interpolation_alpha`): None (0 for gptq, 1 for gptaq/rescomp), a number in [0, 1],
"auto" or "projected". At α = 0 no full-precision stream runs. Every factorization of H that a
solve needs (Astro's costs, α*, W_ref, the sweep's U) is taken from one `HessianFactors`, shared
by the Linears of a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .astro import astro_reshape
from .factors import HessianFactors, factors_of
from ..gguf.types import TENSOR_TYPES
from .gptq import LayerQuantResult, gptq_quantize
from .interpolation import asymmetric_target, auto_alpha, projected_alpha
from .rtn import rtn_quantize
from .successive import successive_quantize

ASYMMETRIC_METHODS = ("gptaq", "rescomp")


@dataclass(frozen=True)
class SolverOptions:
    bits: int
    group_size: int = -1
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    mse: bool = False
    method: str = "gptq"
    alpha: float = 0.25
    asym_alpha: float | str | None = None
    rounding: str = "gptq"
    beam_width: int = 4
    astro: bool = False
    astro_beta: float = 1.0
    astro_steps: int = 25
    astro_lr: float = 1.0
    tensor_type: str | None = None  # a GGUF tensor type: its grid replaces bits, group_size and sym
    keep_rounding_error: bool = False  # the greedy sweep returns each code's rounding error (refine_rounding_lr)

    @property
    def needs_fp_stream(self) -> bool:
        """Whether the solver needs D = 2·ΔX·Xᵀ/N (the full-precision stream). asym_alpha = 0
        scales D away: gptaq is then GPTQ, and rescomp GPTQ with ResComp's residual (X̃ = X),
        both without the stream."""
        if self.method == "rtn":
            return False
        if self.asym_alpha is None:
            return self.method in ASYMMETRIC_METHODS
        return self.asym_alpha != 0  # "auto"/"projected" choose α per layer from D

    @property
    def needs_dxdxt(self) -> bool:
        return self.asym_alpha == "projected"


@dataclass(frozen=True)
class Recipe:
    """One composed solver: names in TARGETS, CORRECTIONS and ROUNDINGS. The asymmetric target
    lives in the sweep's P, so it needs a correction that carries P, and GPTAQ's correction is
    nothing else (with another target rescomp is ResComp's residual alone); successive and nearest
    rounding have no sweep to carry a correction, and nearest no Hessian to aim at a target."""

    target: str
    correction: str
    rounding: str

    def __post_init__(self):
        for kind, value, table in (("target", self.target, TARGETS), ("correction", self.correction, CORRECTIONS),
                                   ("rounding", self.rounding, ROUNDINGS)):
            if value not in table:
                raise ValueError(f"{kind}={value!r} is not valid; allowed: {', '.join(table)}")
        if self.target == "asymmetric" and not CORRECTIONS[self.correction]["p"]:
            raise ValueError(f"target={self.target!r} with correction={self.correction!r}: the asymmetric "
                             "target is carried by the P-term of the gptaq and rescomp corrections, and only there")
        if self.correction == "gptaq" and self.target != "asymmetric":
            raise ValueError(f"correction='gptaq' with target={self.target!r}: GPTAQ's correction is its P-term, "
                             "which only the asymmetric target has")
        if self.rounding in ("successive", "nearest") and self.correction != "none":
            raise ValueError(f"rounding={self.rounding!r} has no sweep to carry correction={self.correction!r}")
        if self.rounding == "nearest" and self.target != "symmetric":
            raise ValueError(f"rounding='nearest' sees no Hessian and aims at W itself, not target={self.target!r}")


@dataclass
class _Problem:
    """What the target, correction and rounding of one solve read."""

    W: torch.Tensor  # the weight the solve starts from (Astro's W′ when astro is on)
    H: torch.Tensor
    D: torch.Tensor | None
    alpha: float  # the interpolation α (0 without the full-precision stream)
    opts: SolverOptions
    factors: HessianFactors


def _symmetric(p: _Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    return p.W, None


def _interpolated(p: _Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not p.alpha:
        return p.W, None
    return asymmetric_target(p.W, p.H, p.D, p.alpha, p.opts.damp_percent, p.factors), None


def _asymmetric(p: _Problem) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sweep's P is built from α·D (with α = 0 a zero D: the sweep then adds exact zeros)."""
    return p.W, p.alpha * p.D


# (target weight, α·D for the sweep's P or None) of a problem
TARGETS: dict[str, Callable[[_Problem], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "symmetric": _symmetric, "interpolated": _interpolated, "asymmetric": _asymmetric,
}
# each correction: whether the sweep carries GPTAQ's P, and whether it adds ResComp's residual
CORRECTIONS: dict[str, dict] = {
    "none": {"p": False, "residual": False}, "gptaq": {"p": True, "residual": False},
    "rescomp": {"p": True, "residual": True},
}


def _grid(opts: SolverOptions) -> dict:
    return dict(bits=opts.bits, group_size=opts.group_size, sym=opts.sym, damp_percent=opts.damp_percent,
                block_size=opts.block_size, mse=opts.mse, tensor_type=opts.tensor_type)


def _sweep(p: _Problem, target: torch.Tensor, dxxt, correction: dict, beam_width: int | None) -> LayerQuantResult:
    return gptq_quantize(target, p.H, desc_act=p.opts.desc_act, static_groups=p.opts.static_groups,
                         dxxt=dxxt if correction["p"] else None, alpha=p.opts.alpha, residual=correction["residual"],
                         beam_width=beam_width, factors=p.factors, keep_rounding_error=p.opts.keep_rounding_error,
                         **_grid(p.opts))


def _greedy(p, target, dxxt, correction) -> LayerQuantResult:
    return _sweep(p, target, dxxt, correction, None)


def _beam(p, target, dxxt, correction) -> LayerQuantResult:
    return _sweep(p, target, dxxt, correction, p.opts.beam_width)


def _successive(p, target, dxxt, correction) -> LayerQuantResult:
    return successive_quantize(target, p.H, factors=p.factors, **_grid(p.opts))


def _nearest(p, target, dxxt, correction) -> LayerQuantResult:
    o = p.opts
    return rtn_quantize(target, bits=o.bits, group_size=o.group_size, sym=o.sym, mse=o.mse, tensor_type=o.tensor_type)


ROUNDINGS: dict[str, Callable[..., LayerQuantResult]] = {
    "greedy": _greedy, "beam": _beam, "successive": _successive, "nearest": _nearest,
}
_ROUNDING_OF = {"gptq": "greedy", "beam": "beam", "successive": "successive"}  # the public option → the registry


def recipe_of(opts: SolverOptions) -> Recipe:
    """The recipe the public options name; a combination with no form is refused, naming it."""
    if opts.method == "rtn":
        return Recipe("symmetric", "none", "nearest")
    if opts.rounding not in _ROUNDING_OF:
        raise ValueError(f"rounding={opts.rounding!r} is not valid; allowed: {', '.join(_ROUNDING_OF)}")
    rounding, stream = _ROUNDING_OF[opts.rounding], opts.needs_fp_stream
    if opts.method == "gptq":
        return Recipe("interpolated" if stream else "symmetric", "none", rounding)
    if opts.method not in ASYMMETRIC_METHODS:
        raise ValueError(f"method={opts.method!r} is not valid; allowed: rtn, gptq, {', '.join(ASYMMETRIC_METHODS)}")
    if rounding == "successive":
        raise ValueError(f"rounding='successive' decodes toward a fixed target and has no form for "
                         f"method={opts.method!r}; use method='gptq' with asym_alpha, or rounding 'gptq'/'beam'")
    correction = opts.method if stream or opts.method == "rescomp" else "none"
    return Recipe("asymmetric" if stream else "symmetric", correction, rounding)


def interpolation_alpha(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, G: torch.Tensor | None,
                        opts: SolverOptions, factors: HessianFactors | None = None) -> float:
    """The α of X_α = X + α·ΔX for this layer."""
    a = opts.asym_alpha
    if a is None:
        return 1.0 if opts.method in ASYMMETRIC_METHODS else 0.0
    if isinstance(a, (int, float)):
        return float(a)
    if a == "auto":
        q0 = rtn_quantize(W, bits=opts.bits, group_size=opts.group_size, sym=opts.sym, mse=opts.mse,
                          tensor_type=opts.tensor_type).weight
        return auto_alpha(W, q0, H, D, opts.damp_percent, factors)
    if a == "projected":
        return projected_alpha(W, H, D, G, opts.damp_percent, factors)
    raise ValueError(f"asym_alpha={a!r} is not valid; allowed: None, a number in [0, 1], 'auto', 'projected'")


def _astro(W: torch.Tensor, H: torch.Tensor, opts: SolverOptions, factors: HessianFactors) -> torch.Tensor:
    """Astro's W′ (on a GGUF grid it models the type's code width and sub-block as a uniform grid)."""
    t = TENSOR_TYPES[opts.tensor_type] if opts.tensor_type else None
    return astro_reshape(W, H, beta=opts.astro_beta, steps=opts.astro_steps, lr=opts.astro_lr,
                         group_size=t.sub if t else opts.group_size, bits=t.bits if t else opts.bits,
                         sym=(not t.affine) if t else opts.sym, damp_percent=opts.damp_percent, factors=factors)


def solve_linear(W: torch.Tensor, H: torch.Tensor | None, opts: SolverOptions, D: torch.Tensor | None = None,
                 G: torch.Tensor | None = None, factors: HessianFactors | None = None,
                 recipe: Recipe | None = None) -> tuple[LayerQuantResult, float]:
    """Quantize W (out × in) given H = 2·X·Xᵀ/N, and for the asymmetric options D = 2·ΔX·Xᵀ/N and
    G = 2·ΔX·ΔXᵀ/N. Returns the result and the interpolation α used. `factors` shares the
    factorizations of H with the other Linears that have the same H (None: this solve's own);
    `recipe` composes the solver directly (None: the one the options name, `recipe_of`);
    round-to-nearest needs no H."""
    recipe = recipe or recipe_of(opts)
    if recipe.rounding == "nearest":
        return ROUNDINGS["nearest"](_Problem(W, H, None, 0.0, opts, None), W, None, None), 0.0
    if (opts.needs_fp_stream or recipe.target != "symmetric") and D is None:
        raise ValueError(f"method={opts.method!r} with asym_alpha={opts.asym_alpha!r} (target={recipe.target!r}) "
                         "needs the full-precision stream statistic D = 2·ΔX·Xᵀ/N")
    factors = factors_of(H, opts.damp_percent, factors)
    if opts.astro:  # the solver starts from, and aims at, the reshaped weights
        W = _astro(W, H, opts, factors)
    a = interpolation_alpha(W, H, D, G, opts, factors) if opts.needs_fp_stream else 0.0
    problem = _Problem(W, H, D, a, opts, factors)
    target, dxxt = TARGETS[recipe.target](problem)
    return ROUNDINGS[recipe.rounding](problem, target, dxxt, CORRECTIONS[recipe.correction]), a
