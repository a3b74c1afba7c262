"""GPTAQ (Li et al., ICML 2025) and ResComp (arXiv 2604.07955): asymmetric calibration.

GPTAQ's objective is ‖Q·X − W·X̃‖²: the quantized layer, fed the quantized model's inputs X,
should reproduce the full-precision output (inputs X̃, ΔX = X̃ − X). The residual W·ΔX is
split into per-column terms through

    P = α · triu(D·Uᵀ, 1) · U,      D = 2·ΔX·Xᵀ/N,      H⁻¹ = UᵀU (damped H),

and the GPTQ sweep adds −w_i ⊗ P[i, i+1:] to its update (see `gptq.py`). α = 0.25 is the
reference code's default.

ResComp aligns every step with the original output W0·X̃, adding the term (W0 − W)·X̃ through

    R = α · triu((D + H)·Uᵀ, 1) · U

so that the column step becomes W[:, i+1:] −= err ⊗ U[i] − w_i ⊗ P[i] − (W0_i − w_i) ⊗ R[i].
Because H·Uᵀ = U⁻¹ (up to the damping term λ·Uᵀ, which is lower triangular and vanishes under
triu(·, 1)), R = P + α·(I − diag(U)⁻¹·U) on the strict upper triangle: ResComp is GPTAQ with the
P-term driven by W0 and the error err_i + α·(W0_i − w_i)/U_ii. `gptq.py` runs it in that form.
"""

from __future__ import annotations

import torch


def gptaq_p_matrix(dxxt: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """P = α · triu(D·Uᵀ, 1) · U (strictly upper triangular, in × in)."""
    return alpha * torch.triu(dxxt @ U.t(), diagonal=1) @ U


def rescomp_r_matrix(dxxt: torch.Tensor, hessian: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """R = α · triu((D + H)·Uᵀ, 1) · U, the ResComp matrix as its paper defines it (H undamped)."""
    return alpha * torch.triu((dxxt + hessian) @ U.t(), diagonal=1) @ U


def rescomp_r_from_p(P: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """The same R through the identity R = P + α·(I − diag(U)⁻¹·U), strict upper triangle."""
    return P + alpha * torch.triu(-U / torch.diag(U)[:, None], diagonal=1)
