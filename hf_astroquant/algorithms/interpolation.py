"""Regularized asymmetric calibration (SNRQ / CoreQ, arXiv 2602.05902): interpolate the targets.

With X_α = X + α·ΔX the layer objective ‖W·X_α − Q·X‖² equals, up to a constant,
(1 − α)·‖(W − Q)X‖² + α·‖W·X̃ − Q·X‖²: α = 0 is GPTQ's symmetric target, α = 1 GPTAQ's full
asymmetric one. It keeps GPTQ's quadratic form

    tr((Q − W_ref)·H·(Q − W_ref)ᵀ),     W_ref = W·(H + α·D)·H⁻¹ = W + α·(W·D)·H⁻¹,

with H = 2·X·Xᵀ/N (damped) and D = 2·ΔX·Xᵀ/N, so any GPTQ-form solver can aim at W_ref.

Choices of α (per layer):
  - a number in [0, 1];
  - "auto": the α that puts W_ref closest to a given quantized weight Q (we use round-to-nearest
    of W, which needs no solve): α* = ⟨Q − W, W·D⟩ / tr(W·D·H⁻¹·Dᵀ·Wᵀ), clamped to [0, 1];
  - "projected": the share of the mismatch W·ΔX that a weight acting on X can reach,
    α = ‖W·ΔX·Π_X‖² / ‖W·ΔX‖² = tr(W·D·H⁻¹·Dᵀ·Wᵀ) / tr(W·G·Wᵀ), G = 2·ΔX·ΔXᵀ/N, Π_X the
    projection onto the row space of X (H⁻¹ damped: a regularized projection).
"""

from __future__ import annotations

import torch

from .factors import HessianFactors, factors_of


def _wd_hinv_norm(WD: torch.Tensor, L: torch.Tensor) -> float:
    """tr(M·H⁻¹·Mᵀ) = ‖M·L⁻ᵀ‖² for H = L·Lᵀ."""
    return float(torch.linalg.solve_triangular(L, WD.t(), upper=False).square().sum())


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, dxxt: torch.Tensor, alpha: float,
                      damp_percent: float = 0.01, factors: HessianFactors | None = None) -> torch.Tensor:
    """W_ref = W + α·(W·D)·H⁻¹ (H damped like the solver's; `factors` shares its factorization)."""
    W = weight.float()
    if alpha == 0:
        return W.clone()
    L, _ = factors_of(hessian, damp_percent, factors).cholesky()
    shift = torch.cholesky_solve((W @ dxxt.float()).t(), L).t()  # (W·D)·H⁻¹, H symmetric
    return W + alpha * shift


def auto_alpha(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, dxxt: torch.Tensor,
               damp_percent: float = 0.01, factors: HessianFactors | None = None) -> float:
    """α* = ⟨Q − W, W·D⟩ / tr(W·D·H⁻¹·Dᵀ·Wᵀ), clamped to [0, 1] (0 when W·D = 0)."""
    W = weight.float()
    WD = W @ dxxt.float()
    den = _wd_hinv_norm(WD, factors_of(hessian, damp_percent, factors).cholesky()[0])
    if den <= 0:
        return 0.0
    num = float(((quantized.float() - W) * WD).sum())
    return min(1.0, max(0.0, num / den))


def projected_alpha(weight: torch.Tensor, hessian: torch.Tensor, dxxt: torch.Tensor, dxdxt: torch.Tensor,
                    damp_percent: float = 0.01, factors: HessianFactors | None = None) -> float:
    """α = tr(W·D·H⁻¹·Dᵀ·Wᵀ) / tr(W·G·Wᵀ), clamped to [0, 1] (0 when W·ΔX = 0)."""
    W = weight.float()
    den = float(((W @ dxdxt.float()) * W).sum())
    if den <= 0:
        return 0.0
    num = _wd_hinv_norm(W @ dxxt.float(), factors_of(hessian, damp_percent, factors).cholesky()[0])
    return min(1.0, max(0.0, num / den))
