"""LoRMA: a multiplicative low-rank update of the weight (Bihany et al., 2025), the
additive-identity form:

    W' = (I + s · B A) W,     ΔW = s · B (A W),
    y  = x W'ᵀ + b = (x Wᵀ + b) + s · ((x Wᵀ) Aᵀ) Bᵀ,
    A ∈ ℝ^{r×out} (Kaiming-uniform),   B ∈ ℝ^{out×r} (zeros),   s = α / r.

The update acts on the layer's *output* space: it mixes the rows of W rather than adding
a new low-rank matrix, so ``ΔW``'s row space stays inside W's. ``B = 0`` makes the layer
exact at initialization. The forward reuses the base output (``(x Wᵀ) Aᵀ = base(x) Aᵀ − A b``): one
base matmul plus two thin ones, the cost of a LoRA whose input is ``out``-wide.
Trainable parameters per layer: ``2 · r · out``. Merges exactly (``W ← W + s·B A W``).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "lorma", rank=4)
>>> sk.trainable_parameters(model)
256
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register


@register
class LoRMALinear(AdaptedLinear):
    method = "lorma"
    options = ("alpha",)
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        A = torch.empty(rank, self.out_features, dtype=self.adapter_dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = self.new_parameter(A)
        self.lora_B = self.new_parameter(torch.zeros(self.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        flat = self.adapter_input(base).reshape(-1, self.out_features)
        inner = flat @ self.lora_A.T
        bias = self.base_layer.bias
        if bias is not None:  # (x Wᵀ) Aᵀ = (base − b) Aᵀ = base Aᵀ − A b: the bias leaves on r entries, not out
            inner = inner - self.lora_A @ bias.to(inner.dtype)
        if base.dtype == inner.dtype:
            return torch.addmm(base.reshape(-1, self.out_features), inner, self.lora_B.T,
                               alpha=self.scaling).reshape(base.shape)
        return base + (self.scaling * (inner @ self.lora_B.T)).reshape(base.shape).to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ (self.lora_A @ self.base_weight().to(self.adapter_dtype)))
