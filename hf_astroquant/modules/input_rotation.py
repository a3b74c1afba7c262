"""`InputRotation`: the online rotation x ↦ x·R of a packed layer's input (algorithms/kron_rotation.py).

Persistent tensors (under the layer's name, e.g. ``mlp.down_proj.input_rotation.signs``):
    signs  fp32 (n,)     s ∈ {±1}
    mix    fp32 (m, m)   A, orthogonal
The Hadamard factors are rebuilt from the width; nothing else is stored.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.kron_rotation import kron_shape, random_signs_and_mix, rotate_rows
from ..algorithms.transforms import hadamard


class InputRotation(nn.Module):
    def __init__(self, n: int, device: torch.device | str | None = None):
        super().__init__()
        m, _, _ = kron_shape(n)
        self.n = n
        self.register_buffer("signs", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("mix", torch.eye(m, dtype=torch.float32, device=device))
        self._hadamards: tuple | None = None  # (device, dtype, (H_a, H_b)) of the last forward

    @classmethod
    def random(cls, n: int, seed: int) -> "InputRotation":
        rotation = cls(n)
        signs, mix = random_signs_and_mix(n, seed)
        rotation.signs.copy_(signs)
        rotation.mix.copy_(mix)
        return rotation

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._hadamards is None or self._hadamards[:2] != (x.device, x.dtype):
            _, a, b = kron_shape(self.n)
            self._hadamards = (x.device, x.dtype, tuple(hadamard(k).to(device=x.device, dtype=x.dtype) for k in (a, b)))
        return self._hadamards[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_rows(x, self.signs, self.mix, self._factors(x))

    @torch.no_grad()
    def fold_into(self, weight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """W·R (each row of W rotated, in fp64), in W's dtype: the weight that reads the rotated input;
        with `inverse`, W·Rᵀ (which undoes it)."""
        return rotate_rows(weight.double(), self.signs.double(), self.mix.double(), inverse=inverse).to(weight.dtype)

    def extra_repr(self) -> str:
        m, a, b = kron_shape(self.n)
        return f"n={self.n}, factors=({m}, {a}, {b})"
