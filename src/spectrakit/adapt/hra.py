"""HRA: Householder reflection adaptation (Yuan et al., 2024).

    W' = W H,   H = H₁ H₂ ⋯ H_r,   Hᵢ = I − 2 uᵢ uᵢᵀ / ‖uᵢ‖²,   uᵢ ∈ ℝ^{in},
    y  = (x Hᵀ) Wᵀ + b = (x H_r ⋯ H₁) Wᵀ + b,

an orthogonal change of the input basis, applied reflection by reflection (never
forming ``H`` in ``forward``). The ``u``'s start in equal pairs
(``u₂ᵢ₋₁ = u₂ᵢ``), so ``H = I`` at initialization and ``rank`` must be even. The
regularizer ``‖ÛᵀÛ − I‖²_F`` (``Û``: the normalized u's) is returned by
:func:`spectrakit.adapter_penalty`. Trainable parameters per layer: ``r · in``.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "hra", rank=4)
>>> sk.trainable_parameters(model)
256
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .base import AdaptedLinear, register


@register
class HRALinear(AdaptedLinear):
    method = "hra"
    options = ()

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "",
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        half = torch.empty(rank // 2, self.in_features, dtype=self.adapter_dtype)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        self.reflections = self.new_parameter(half.repeat_interleave(2, dim=0))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        if kwargs["rank"] % 2:
            raise SpectrakitError(f"hra needs an even rank (reflections start in cancelling pairs), "
                                  f"got {kwargs['rank']} for layer {name}")

    def _reflect(self, h: torch.Tensor, order: range) -> torch.Tensor:
        units = self.reflections / self.reflections.norm(dim=1, keepdim=True)
        for i in order:
            u = units[i]
            h = h - 2.0 * (h @ u)[..., None] * u
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = self._reflect(self.adapter_input(x), range(self.rank - 1, -1, -1))
        return self.base_layer(rotated.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        # a row w of W becomes w H₁ H₂ ⋯ H_r: reflect by H₁ first
        return self._reflect(self.base_weight().to(self.adapter_dtype), range(self.rank))

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().to(self.adapter_dtype)

    def penalty(self) -> torch.Tensor:
        units = self.reflections / self.reflections.norm(dim=1, keepdim=True)
        eye = torch.eye(self.rank, dtype=units.dtype, device=units.device)
        return ((units @ units.T - eye) ** 2).sum()
