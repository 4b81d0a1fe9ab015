"""SORSA: singular vectors and values trained together, kept near-orthonormal (Cao, 2024).

With the top-r triplets ``U_r, Σ_r, V_r`` of ``W``:

    W_res = W − U_r Σ_r V_rᵀ                      (frozen)
    W'    = W_res + U_p diag(s_p) V_pᵀ,           U_p = U_r, s_p = σ_r, V_pᵀ = V_rᵀ at init,
    y     = x W_resᵀ + b + ((x V_p) ⊙ s_p) U_pᵀ,

and the orthonormality regularizer (add it to the loss through
:func:`spectrakit.adapter_penalty`, times the paper's γ)

    ‖U_pᵀ U_p − I‖²_F + ‖V_pᵀ V_p − I‖²_F.

Exact at initialization up to rounding of ``W_res``. Trainable parameters per layer:
``r · (in + out + 1)``. ``residual=True`` (set by :func:`spectrakit.load_adapter` for an
adapter written by :func:`spectrakit.adapt.init_from_checkpoint`) wraps a layer that
already holds ``W_res``: no SVD, nothing subtracted, the factors are loaded.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "sorsa", rank=4)
>>> sk.trainable_parameters(model)
388
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register


@register
class SORSALinear(AdaptedLinear):
    method = "sorsa"
    options = ("svd_method",)
    rewrites_base = True

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", svd_method: str = "krylov",
                 residual: bool = False, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.svd_method = svd_method
        self.residual = bool(residual)
        if self.residual:  # the base is W_res already; the factors are loaded next
            U = torch.zeros(self.out_features, rank, dtype=self.adapter_dtype)
            S = torch.zeros(rank, dtype=self.adapter_dtype)
            Vh = torch.zeros(rank, self.in_features, dtype=self.adapter_dtype)
        else:
            U, S, Vh = self.factors(rank, "top", svd_method)
        self.U_p = self.new_parameter(U)
        self.S_p = self.new_parameter(S)
        self.Vh_p = self.new_parameter(Vh)
        if not self.residual:
            with torch.no_grad():
                self.subtract_from_base(U * S, Vh)

    def config(self) -> dict[str, Any]:
        config = super().config()  # "residual" only when set, so that other saved configs stay as they were
        residual = config.pop("residual")
        return {**config, "residual": True} if residual else config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        update = ((self.adapter_input(x) @ self.Vh_p.T) * self.S_p) @ self.U_p.T
        return base + update.to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.U_p * self.S_p) @ self.Vh_p

    def penalty(self) -> torch.Tensor:
        eye = torch.eye(self.rank, dtype=self.U_p.dtype, device=self.U_p.device)
        return ((self.U_p.T @ self.U_p - eye) ** 2).sum() + ((self.Vh_p @ self.Vh_p.T - eye) ** 2).sum()
