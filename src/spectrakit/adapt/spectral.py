"""Spectral adapter: fine-tune the top-r singular vectors themselves (Zhang & Pilanci, 2024).

With the top-r triplets ``U_r, Σ_r, V_r`` of ``W`` (frozen), two variants:

``variant="additive"`` — trainable ``ΔU ∈ ℝ^{out×r}``, ``ΔV ∈ ℝ^{in×r}`` (zeros):

    W' = W − U_r Σ_r V_rᵀ + (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ,
    trainable parameters per layer: ``r · (in + out)``.

``variant="rotational"`` — trainable skew-symmetric ``K_U, K_V`` (``r(r−1)/2`` free
entries each, zeros) turned into rotations by the Cayley map
``R = (I − K)⁻¹ (I + K)``:

    W' = W − U_r Σ_r V_rᵀ + U_r R_U Σ_r R_Vᵀ V_rᵀ,
    trainable parameters per layer: ``r · (r − 1)``.

Both are computed as ``y = x Wᵀ + b + Δ(x)`` with ``Δ`` exactly zero at
initialization (``ΔU = ΔV = 0``, ``R = I``).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "spectral", rank=4, variant="rotational")
>>> sk.trainable_parameters(model)
12
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .base import AdaptedLinear, register

VARIANTS = ("additive", "rotational")


def cayley(free: torch.Tensor, rank: int) -> torch.Tensor:
    """The rotation ``(I − K)⁻¹(I + K)`` of the skew matrix ``K`` with upper entries ``free``."""
    rows, cols = torch.triu_indices(rank, rank, offset=1, device=free.device)
    K = torch.zeros(rank, rank, dtype=free.dtype, device=free.device).index_put((rows, cols), free)
    K = K - K.T
    eye = torch.eye(rank, dtype=free.dtype, device=free.device)
    return torch.linalg.solve(eye - K, eye + K)


@register
class SpectralLinear(AdaptedLinear):
    method = "spectral"
    options = ("variant", "svd_method")
    # buffers and parameters, typed here (nn.Module.__getattr__ would give Tensor | Module)
    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor
    delta_U: nn.Parameter
    delta_V: nn.Parameter
    skew_U: nn.Parameter
    skew_V: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", variant: str = "additive",
                 svd_method: str = "krylov", init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.variant, self.svd_method = variant, svd_method
        U, S, Vh = self.factors(rank, "top", svd_method)
        self.new_buffer("U", U)
        self.new_buffer("sigma", S)
        self.new_buffer("V", Vh.T)
        if variant == "additive":
            self.delta_U = self.new_parameter(torch.zeros_like(U))
            self.delta_V = self.new_parameter(torch.zeros_like(Vh.T))
        else:
            free = rank * (rank - 1) // 2
            self.skew_U = self.new_parameter(torch.zeros(free))
            self.skew_V = self.new_parameter(torch.zeros(free))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        if kwargs.get("variant", "additive") not in VARIANTS:
            raise SpectrakitError(f"variant={kwargs['variant']!r} must be one of {', '.join(VARIANTS)}")

    def _core(self) -> torch.Tensor:
        """``R_U Σ R_Vᵀ − Σ`` (rotational variant)."""
        R_U, R_V = cayley(self.skew_U, self.rank), cayley(self.skew_V, self.rank)
        return (R_U * self.sigma) @ R_V.T - torch.diag(self.sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        h = self.adapter_input(x)
        if self.variant == "additive":
            tuned = ((h @ (self.V + self.delta_V)) * self.sigma) @ (self.U + self.delta_U).T
            update = tuned - ((h @ self.V) * self.sigma) @ self.U.T
        else:
            update = ((h @ self.V) @ self._core().T) @ self.U.T
        return base + update.to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        if self.variant == "additive":
            tuned = ((self.U + self.delta_U) * self.sigma) @ (self.V + self.delta_V).T
            return tuned - (self.U * self.sigma) @ self.V.T
        return self.U @ self._core() @ self.V.T
