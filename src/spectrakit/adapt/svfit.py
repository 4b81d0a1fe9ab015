"""SVFit: train only the top-r singular values of each weight (000, 002).

With the top-r triplets ``U_r, Σ_r = diag(σ), V_r`` of ``W`` frozen and trainable
values ``s`` started at ``σ``:

    W' = W + U_r diag(s − σ) V_rᵀ,
    y  = x Wᵀ + b + ((x V_r) ⊙ (s − σ)) U_rᵀ.

``s − σ`` is exactly zero at initialization, so the adapted layer is the base layer.
Trainable parameters per layer: ``r``.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "svfit", rank=4)
>>> sk.trainable_parameters(model)
4
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register


@register
class SVFitLinear(AdaptedLinear):
    method = "svfit"
    options = ("svd_method",)
    # buffers and parameters, typed here (nn.Module.__getattr__ would give Tensor | Module)
    U: torch.Tensor
    Vh: torch.Tensor
    sigma: torch.Tensor
    singular_values: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", svd_method: str = "krylov",
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.svd_method = svd_method
        U, S, Vh = self.factors(rank, "top", svd_method)
        self.new_buffer("U", U)
        self.new_buffer("Vh", Vh)
        self.new_buffer("sigma", S)
        self.singular_values = self.new_parameter(S.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        update = ((self.adapter_input(x) @ self.Vh.T) * (self.singular_values - self.sigma)) @ self.U.T
        return base + update.to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.U * (self.singular_values - self.sigma)) @ self.Vh
