"""The damped factorizations of one Hessian, each computed once and shared.

The Linears of one stage (q/k/v, gate/up, one expert's gate/up) share H = 2·X·Xᵀ/N, and one
Linear's solve may need H factored for several steps. Every step reads its factor from here:

    cholesky()            L·Lᵀ = H + λ·mean(diag H)·I, in the weight's column order
                          (α*, the projected α, the interpolated target W_ref, Astro's costs)
    sweep(desc_act)       U with UᵀU = (H′ + λ·mean(diag H′)·I)⁻¹ in the sweep's column order,
                          H′ = H with unit curvature on dead columns (GPTQ, GPTAQ, ResComp)
    ascending_cholesky()  L of H′ permuted by ascending diag H (successive rounding)

Each form is factored on first use and then handed to every later caller (the damping λ escalates
×10 while H stays singular, `gptq.damped_cholesky`). The forms are not derived from one another:
each is what its solver has always factored, so sharing changes no result, only the count.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


class HessianFactors:
    """Lazily computed, shared factorizations of `hessian` damped by `damp_percent` (thread-safe:
    the members of a stage may be solved in threads)."""

    def __init__(self, hessian: torch.Tensor, damp_percent: float):
        self.hessian, self.damp_percent = hessian, damp_percent
        self._cache: dict = {}
        self._lock = threading.Lock()
        self.computed: list = []  # the forms factored, in order: what sharing saved is visible in tests

    def _once(self, key, make: Callable):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
                self.computed.append(key)
            return self._cache[key]

    def cholesky(self) -> tuple[torch.Tensor, float]:
        """(L, the damping used) in the weight's column order."""
        from .gptq import damped_cholesky

        return self._once("cholesky", lambda: damped_cholesky(self.hessian, self.damp_percent))

    def sweep(self, desc_act: bool):
        """(dead columns, the sweep's column order, U in that order, the damping used)."""
        from .gptq import _factor_in_sweep_order

        return self._once(("sweep", bool(desc_act)),
                          lambda: _factor_in_sweep_order(self.hessian, desc_act, self.damp_percent))

    def ascending_cholesky(self):
        """(dead columns, the decoding order: ascending diag H, L of H′ in that order, the damping used)."""
        from .successive import factor_ascending

        return self._once("ascending", lambda: factor_ascending(self.hessian, self.damp_percent))


def factors_of(hessian: torch.Tensor, damp_percent: float, factors: HessianFactors | None) -> HessianFactors:
    """`factors` when the caller shares one (it must be of `hessian`, with the same damping), else a
    private one for `hessian`."""
    if factors is None:
        return HessianFactors(hessian, damp_percent)
    if factors.hessian.shape != hessian.shape or factors.damp_percent != damp_percent:
        raise ValueError("the shared factorizations belong to another Hessian or damp_percent")
    return factors
