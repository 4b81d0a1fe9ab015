"""LoRA: a trainable low-rank update next to a frozen weight (Hu et al., 2021).

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,     ΔW = s · B A,
    A ∈ ℝ^{r×in} (Kaiming-uniform), B ∈ ℝ^{out×r} (zeros),
    s = α / r  (LoRA)   or   s = α / √r  (rsLoRA, ``rslora=True``).

``B = 0`` makes the adapted layer exactly the base layer at initialization.
Trainable parameters per layer: ``r · (in + out)``. ``alpha`` defaults to ``r`` (s = 1).

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(64, 32)
>>> model = sk.adapt(torch.nn.Sequential(layer), "lora", rank=4, alpha=8)
>>> sk.trainable_parameters(model)
384
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .base import AdaptedLinear, register


def add_low_rank(base: torch.Tensor, h: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 scale: float = 1.0) -> torch.Tensor:
    """``base + scale · (h @ down) @ up`` over the last dimension, the sum fused into one ``addmm``.

    Args:
        base: the base layer's output, ``… × out`` (any float dtype).
        h: the adapter's input, ``… × in``, in the adapter dtype.
        down: ``in × r``.
        up: ``r × out``.
        scale: the factor on the low-rank term.
    """
    inner = h.reshape(-1, h.shape[-1]) @ down
    flat = base.reshape(-1, base.shape[-1])
    if flat.dtype == inner.dtype:
        return torch.addmm(flat, inner, up, alpha=scale).reshape(base.shape)
    return base + (scale * (inner @ up)).to(base.dtype).reshape(base.shape)


@register
class LoRALinear(AdaptedLinear):
    method = "lora"
    options: ClassVar[tuple[str, ...]] = ("alpha", "rslora")

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 rslora: bool = False, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if self.rslora else rank)
        A, B = self.initial_factors(init or {})
        self.lora_A = self.new_parameter(A)
        self.lora_B = self.new_parameter(B)

    def initial_factors(self, init: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` at initialization; subclasses (PiSSA, EVA) start elsewhere."""
        A = init.get("A")
        if A is None:
            A = torch.empty(self.rank, self.in_features, dtype=self.adapter_dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's default, as in the paper's code
        return A, torch.zeros(self.out_features, self.rank, dtype=self.adapter_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        update = (self.adapter_input(x) @ self.lora_A.T) @ self.lora_B.T
        return base + (self.scaling * update).to(base.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)
