"""Choose and run the layer solver for one Linear: the method × interpolation × rounding matrix.

    method     gptq     ‖(Q − W_ref)X‖² (W_ref = W unless asym_alpha shifts the target)
               gptaq    GPTAQ's P-term sweep toward ‖Q·X − W·X_α‖²
               rescomp  GPTAQ plus ResComp's compensation-aware residual (the config refuses it
                        below 3 bits, where it measured worse than GPTAQ: `config.RESCOMP_MIN_BITS`)
    astro      reshape W first (Astro, astro.py): the solver starts from, and aims at, the reshaped W′
    asym_alpha the interpolation α of X_α = X + α·ΔX: None (0 for gptq, 1 for gptaq/rescomp),
               a number in [0, 1], "auto" or "projected" (see interpolation.py). For gptq it
               shifts the target to W_ref; for gptaq/rescomp it scales D = 2·ΔX·Xᵀ/N. At 0 no
               full-precision stream runs: gptaq is GPTQ, rescomp GPTQ plus ResComp's residual
               (X̃ = X; the paper's "GPTQ+ResComp").
    rounding   "gptq" (greedy sweep), "beam" (bounded search, `beam_width` beams per row),
               "successive" (Cholesky-of-H reverse decoding toward W_ref; gptq only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .astro import astro_reshape
from .gguf_types import TENSOR_TYPES
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

    @property
    def needs_fp_stream(self) -> bool:
        """Whether the solver needs D = 2·ΔX·Xᵀ/N (the full-precision stream). asym_alpha = 0
        scales D away: gptaq is then GPTQ, and rescomp GPTQ with ResComp's residual (X̃ = X),
        both without the stream."""
        if self.asym_alpha is None:
            return self.method in ASYMMETRIC_METHODS
        return self.asym_alpha != 0  # "auto"/"projected" choose α per layer from D

    @property
    def needs_dxdxt(self) -> bool:
        return self.asym_alpha == "projected"


def interpolation_alpha(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, G: torch.Tensor | None,
                        opts: SolverOptions) -> float:
    """The α of X_α = X + α·ΔX for this layer."""
    a = opts.asym_alpha
    if a is None:
        return 1.0 if opts.method in ASYMMETRIC_METHODS else 0.0
    if isinstance(a, (int, float)):
        return float(a)
    if a == "auto":
        q0 = rtn_quantize(W, bits=opts.bits, group_size=opts.group_size, sym=opts.sym, mse=opts.mse,
                          tensor_type=opts.tensor_type).weight
        return auto_alpha(W, q0, H, D, opts.damp_percent)
    if a == "projected":
        return projected_alpha(W, H, D, G, opts.damp_percent)
    raise ValueError(f"asym_alpha={a!r} is not valid; allowed: None, a number in [0, 1], 'auto', 'projected'")


def solve_linear(W: torch.Tensor, H: torch.Tensor, opts: SolverOptions, D: torch.Tensor | None = None,
                 G: torch.Tensor | None = None) -> tuple[LayerQuantResult, float]:
    """Quantize W (out × in) given H = 2·X·Xᵀ/N, and for the asymmetric options D = 2·ΔX·Xᵀ/N and
    G = 2·ΔX·ΔXᵀ/N. Returns the result and the interpolation α used."""
    if opts.needs_fp_stream and D is None:
        raise ValueError(f"method={opts.method!r} with asym_alpha={opts.asym_alpha!r} needs the full-precision "
                         "stream statistic D = 2·ΔX·Xᵀ/N")
    if opts.astro:
        # Astro reshapes the weights inside the flat region of H first; every solver then takes
        # the reshaped weights as its starting point and target. (On a GGUF grid it models the
        # type's code width and sub-block as a uniform grid.)
        t = TENSOR_TYPES[opts.tensor_type] if opts.tensor_type else None
        W = astro_reshape(W, H, beta=opts.astro_beta, steps=opts.astro_steps, lr=opts.astro_lr,
                          group_size=t.sub if t else opts.group_size, bits=t.bits if t else opts.bits,
                          sym=(not t.affine) if t else opts.sym, damp_percent=opts.damp_percent)
    a = interpolation_alpha(W, H, D, G, opts) if opts.needs_fp_stream else 0.0
    grid = dict(bits=opts.bits, group_size=opts.group_size, sym=opts.sym, damp_percent=opts.damp_percent,
                block_size=opts.block_size, mse=opts.mse, tensor_type=opts.tensor_type)
    if opts.method in ASYMMETRIC_METHODS:
        if opts.rounding == "successive":
            raise ValueError(f"rounding='successive' decodes toward a fixed target and has no form for "
                             f"method={opts.method!r}; use method='gptq' with asym_alpha, or rounding 'gptq'/'beam'")
        res = gptq_quantize(W, H, desc_act=opts.desc_act, static_groups=opts.static_groups,
                            dxxt=a * D if opts.needs_fp_stream else None,
                            alpha=opts.alpha, residual=opts.method == "rescomp",
                            beam_width=opts.beam_width if opts.rounding == "beam" else None, **grid)
        return res, a
    target = asymmetric_target(W, H, D, a, opts.damp_percent) if a else W
    if opts.rounding == "successive":
        return successive_quantize(target, H, **grid), a
    res = gptq_quantize(target, H, desc_act=opts.desc_act, static_groups=opts.static_groups,
                        beam_width=opts.beam_width if opts.rounding == "beam" else None, **grid)
    return res, a
