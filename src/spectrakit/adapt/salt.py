"""SALT: scale and shift the top singular values, LoRA on the rest (000).

With the top-r triplets ``U_r, Σ_r = diag(σ), V_r`` of ``W`` (frozen) and trainable
``α`` (ones), ``β`` (zeros), plus a LoRA ``B A`` of rank ``lora_rank`` (``B = 0``):

    W' = W + U_r diag(σ ⊙ (α − 1) + β) V_rᵀ + s · B A,
    y  = x Wᵀ + b + ((x V_r) ⊙ (σ ⊙ (α − 1) + β)) U_rᵀ + s · (x Aᵀ) Bᵀ,

with ``s = lora_alpha / lora_rank``. The low-rank part lives on the frozen residual
``W − U_r Σ_r V_rᵀ``, i.e. the directions the singular-value part cannot reach
(``A`` starts orthogonal to ``V_r``). Exact at initialization (``α − 1 = β = 0``,
``B = 0``). Trainable parameters per layer: ``2r + lora_rank · (in + out)``;
``lora_rank`` defaults to ``r``.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "salt", rank=4)
>>> sk.trainable_parameters(model)
392
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register


@register
class SALTLinear(AdaptedLinear):
    method = "salt"
    options = ("lora_rank", "lora_alpha", "svd_method")
    # buffers and parameters, typed here (nn.Module.__getattr__ would give Tensor | Module)
    U: torch.Tensor
    Vh: torch.Tensor
    sigma: torch.Tensor
    scale: nn.Parameter
    shift: nn.Parameter
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", lora_rank: int | None = None,
                 lora_alpha: float | None = None, svd_method: str = "krylov",
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.lora_rank = int(rank if lora_rank is None else lora_rank)
        self.lora_alpha = float(self.lora_rank if lora_alpha is None else lora_alpha)
        self.svd_method = svd_method
        self.scaling = self.lora_alpha / self.lora_rank
        U, S, Vh = self.factors(rank, "top", svd_method)
        self.new_buffer("U", U)
        self.new_buffer("Vh", Vh)
        self.new_buffer("sigma", S)
        self.scale = self.new_parameter(torch.ones_like(S))
        self.shift = self.new_parameter(torch.zeros_like(S))
        A = torch.empty(self.lora_rank, self.in_features, dtype=self.adapter_dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        A = A - (A @ Vh.T) @ Vh  # start A in the residual's row space
        self.lora_A = self.new_parameter(A)
        self.lora_B = self.new_parameter(torch.zeros(self.out_features, self.lora_rank))

    def _value_change(self) -> torch.Tensor:
        return self.sigma * (self.scale - 1) + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        h = self.adapter_input(x)
        update = ((h @ self.Vh.T) * self._value_change()) @ self.U.T
        update = update + self.scaling * ((h @ self.lora_A.T) @ self.lora_B.T)
        return base + update.to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.U * self._value_change()) @ self.Vh + self.scaling * (self.lora_B @ self.lora_A)

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        lora_rank = kwargs.get("lora_rank")
        if lora_rank is not None:
            super().check_layer(name, out_features, in_features, {"rank": lora_rank})
