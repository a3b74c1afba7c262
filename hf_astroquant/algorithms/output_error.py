"""A solved Linear's error on the full-precision output, up to a constant that no solution changes.

For calibration inputs x (rows; the quantized model's) and the full-precision model's x̃ = x + Δx,
with H = 2·Σxᵀx/N and D = 2·ΣΔxᵀx/N (statistics.py), the target x_α = x + α·Δx (α = 1 for GPTAQ and
ResComp, 0 for GPTQ: `interpolation.py`) and E = W − Ŵ:

    2/N · Σ‖x_α·Wᵀ − x·Ŵᵀ‖² = tr(E·H·Eᵀ) + 2α·tr(W·D·Eᵀ) + α²·tr(W·G·Wᵀ)

(G = 2·ΣΔxᵀΔx/N). The last term does not depend on Ŵ, and all three are invariant under a change
of the input basis x ↦ x·Q (Q orthogonal; W, Ŵ ↦ W·Q, H, D ↦ Qᵀ·H·Q, Qᵀ·D·Q), so the first two
compare solutions of one layer in different rotated bases (`online_rotation.rotation_candidates`).
"""

from __future__ import annotations

import torch


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor,
                 d: torch.Tensor | None = None, alpha: float = 0.0) -> float:
    """tr(E·H·Eᵀ) + 2α·tr(W·D·Eᵀ) with E = W − Ŵ (fp64): the output error without its constant."""
    W = weight.double()
    E = W - quantized.double()
    err = ((E @ hessian.double()) * E).sum()
    if d is not None and alpha:
        err = err + 2 * alpha * ((W @ d.double()) * E).sum()
    return float(err)
