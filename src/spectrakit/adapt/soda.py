"""SODA: singular values and their bases tuned, the bases by Kronecker-factored rotations
(Zhang et al., 2024; seed 003).

With the top-r triplets ``U_r, Σ_r, V_r`` of W (frozen) and rotations of the output and
input spaces, each a Kronecker product of two small orthogonal matrices:

    W' = W − U_r Σ_r V_rᵀ + (Q_out U_r) diag(s) (Q_in V_r)ᵀ,
    Q = Q₁ ⊗ Q₂,   Qᵢ = Cayley(Kᵢ) = (I − Kᵢ)⁻¹(I + Kᵢ),   Kᵢ skew-symmetric,

``s`` starting at ``σ_r`` and every ``K = 0`` (so ``Q = I``): exact at initialization. For a
side of size ``d = a·b`` (``a`` the largest divisor of ``d`` up to ``√d``) the rotation has
``a(a−1)/2 + b(b−1)/2`` free entries instead of ``d(d−1)/2``; ``Q`` is applied as
``(Q₁ ⊗ Q₂) v = vec(Q₁ mat(v) Q₂ᵀ)``, never formed. The paper steps the orthogonal
factors with a Stiefel optimizer; the Cayley map keeps them orthogonal under any optimizer.
A prime ``d`` has no split (``a = 1``) and gets one full ``d × d`` rotation.
Trainable parameters per layer: ``r + Σ_{out, in} [a(a−1)/2 + b(b−1)/2]``. Merges exactly.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "soda", rank=4)
>>> sk.trainable_parameters(model)   # 4 values + out 32 = 4·8: 6 + 28 + in 64 = 8·8: 28 + 28
94
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register
from .lora import add_low_rank
from .spectral import cayley


def kronecker_split(size: int) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = size`` and ``a`` the largest divisor not above ``√size``."""
    a = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return a, size // a


def kronecker_apply(h: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Rows ``v`` of ``h`` mapped to ``(first ⊗ second) v`` (``v`` of size ``a·b``)."""
    a, b = first.shape[0], second.shape[0]
    blocks = h.reshape(*h.shape[:-1], a, b)
    return (first @ blocks @ second.T).reshape(h.shape)


@register
class SODALinear(AdaptedLinear):
    method = "soda"
    options = ("svd_method",)
    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", svd_method: str = "krylov",
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.svd_method = svd_method
        U, S, Vh = self.factors(rank, "top", svd_method)
        self.new_buffer("U", U)
        self.new_buffer("sigma", S)
        self.new_buffer("V", Vh.T)
        self.singular_values = self.new_parameter(S.clone())
        self.out_split, self.in_split = kronecker_split(self.out_features), kronecker_split(self.in_features)
        for side, (a, b) in (("out", self.out_split), ("in", self.in_split)):
            setattr(self, f"skew_{side}_1", self.new_parameter(torch.zeros(a * (a - 1) // 2)))
            setattr(self, f"skew_{side}_2", self.new_parameter(torch.zeros(b * (b - 1) // 2)))

    def rotations(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The two Kronecker factors of ``Q_out`` or ``Q_in``."""
        a, b = self.out_split if side == "out" else self.in_split
        return cayley(getattr(self, f"skew_{side}_1"), a), cayley(getattr(self, f"skew_{side}_2"), b)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q_out U_r`` and ``Q_in V_r``."""
        return (kronecker_apply(self.U.T, *self.rotations("out")).T,
                kronecker_apply(self.V.T, *self.rotations("in")).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the rotations act on the r basis vectors (r·d·(a + b) work, independent of the batch), and
        # the tuned and the removed parts go through one rank-2r product: x [Ṽ V] diag(s, −σ) [Ũ U]ᵀ
        U, V = self.bases()
        down = torch.cat([V, self.V], dim=1)
        up = torch.cat([U * self.singular_values, self.U * -self.sigma], dim=1)
        return add_low_rank(self.base_layer(x), self.adapter_input(x), down, up.T)

    def delta_weight(self) -> torch.Tensor:
        U, V = self.bases()
        return (U * self.singular_values) @ V.T - (self.U * self.sigma) @ self.V.T
