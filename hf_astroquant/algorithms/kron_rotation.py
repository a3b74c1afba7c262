"""A randomized Kronecker-Hadamard rotation, cheap enough to run on a Linear's input at inference.

For a width n = m·p with p the largest power of two dividing n, and p = a·b (a, b powers of two,
a ≤ b):

    R = diag(s) · (A ⊗ H_a ⊗ H_b),   s ∈ {±1}ⁿ, A a random orthogonal m × m matrix,

H_k the normalized Sylvester Hadamard matrix (H_a ⊗ H_b = H_p). R is orthogonal (a product and
Kronecker product of orthogonal matrices), and dense: every output channel mixes every input
channel, which spreads an outlier channel over all of them. A row vector x (viewed as an m × a × b
tensor) is rotated by contracting each axis with its factor, at m + a + b multiply-adds per
element instead of n for a dense matrix (n = 1536: 3 + 16 + 32).

A Linear y = x·Wᵀ keeps its function with the weight W·R when its input is rotated online:
(x·R)·(W·R)ᵀ = x·R·Rᵀ·Wᵀ = x·Wᵀ. The weight W·R is what gets quantized.
"""

from __future__ import annotations

import torch

from .transforms import hadamard, random_orthogonal


def kron_shape(n: int) -> tuple[int, int, int]:
    """(m, a, b) with n = m·a·b: p = a·b the largest power of two dividing n, a ≤ b both powers of two."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive width, got {n}")
    p = n & -n
    k = p.bit_length() - 1
    a = 1 << (k // 2)
    return n // p, a, p // a


def random_signs_and_mix(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random parts of R for width n: signs s (n,) in {±1} and A (m × m, orthogonal), fp64."""
    m, _, _ = kron_shape(n)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    mix = random_orthogonal(m, seed + 1).contiguous() if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return signs, mix


def rotate_rows(x: torch.Tensor, signs: torch.Tensor, mix: torch.Tensor,
                hadamards: tuple[torch.Tensor, torch.Tensor] | None = None, inverse: bool = False) -> torch.Tensor:
    """x·R for every row vector of x (last axis n), in x's dtype; with `inverse`, x·Rᵀ (= x·(Aᵀ ⊗ H_a ⊗
    H_b)·diag(s): Hadamard matrices are symmetric). `hadamards`: (H_a, H_b) already in x's dtype and
    device (built here when not given)."""
    n = x.shape[-1]
    m, a, b = kron_shape(n)
    if signs.shape != (n,) or mix.shape != (m, m):
        raise ValueError(f"rotation of width {signs.shape[0]} (mix {tuple(mix.shape)}) applied to rows of width {n}")
    if hadamards is None:
        hadamards = tuple(hadamard(k).to(device=x.device, dtype=x.dtype) for k in (a, b))
    h_a, h_b = hadamards
    s = signs.to(x.dtype)
    y = (x if inverse else x * s).reshape(-1, m, a, b)
    if b > 1:
        y = y @ h_b
    if a > 1:
        y = (y.transpose(-1, -2) @ h_a).transpose(-1, -2)
    if m > 1:
        a_mix = mix.to(x.dtype)
        y = (y.reshape(-1, m, a * b).transpose(-1, -2) @ (a_mix.t() if inverse else a_mix)).transpose(-1, -2)
    y = y.reshape(x.shape)
    return y * s if inverse else y


def rotation_matrix(signs: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """The dense R = diag(s)·(A ⊗ H_p) (fp64): the slow, obvious form, for checks."""
    _, a, b = kron_shape(signs.shape[0])
    return signs.double().unsqueeze(1) * torch.kron(mix.double().contiguous(), hadamard(a * b))
