"""SaRA: train the smallest-magnitude weights, kept low-rank by a nuclear norm
(Hu et al., 2024; seeds 000, 001).

The ``k = round(fraction · out · in)`` entries of W with the smallest ``|w|`` (the
"temporarily ineffective" parameters; ``fraction = 0.1`` by default, the paper's 10–20 %)
form a fixed mask ``M``; their updates ``δ ∈ ℝᵏ`` train, starting at zero:

    ΔW = scatter_M(δ),    W' = W + ΔW,    y = x W'ᵀ + b,
    adapter_penalty = ‖ΔW‖_*  (nuclear norm, ``spectrakit.linalg.svdvals``),

the nuclear norm being the paper's low-rank constraint on the sparse update. The mask is
recomputed from W on load (a stable sort, so the same W gives the same mask); only ``δ`` is
saved. Exact at initialization. Trainable parameters per layer: ``k``. Merges exactly.
The paper's progressive re-selection of parameters during training is not implemented.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "sara", fraction=0.1)
>>> sk.trainable_parameters(model)
205
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, register


def smallest_entries(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` smallest ``|w|`` (ties broken by position), ascending."""
    order = torch.sort(weight.detach().abs().reshape(-1).float(), stable=True).indices
    return order[:count].sort().values


@register
class SaRALinear(AdaptedLinear):
    method = "sara"
    options = ("fraction",)
    values: nn.Parameter
    positions: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", fraction: float = 0.1,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.fraction = float(fraction)
        count = max(1, round(self.fraction * self.out_features * self.in_features))
        self.register_buffer("positions", smallest_entries(self.base_weight(), count), persistent=False)
        self.values = self.new_parameter(torch.zeros(count))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        fraction = kwargs.get("fraction", 0.1)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise SpectrakitError(f"fraction={fraction!r} must be in (0, 1]")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "fraction": self.fraction}

    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.positions,), self.values).reshape(self.out_features, self.in_features)

    def updated_weight(self) -> torch.Tensor:
        """``W + ΔW`` as one scatter-add of ``δ`` into a copy of W (differentiable in ``δ``)."""
        flat = self.base_weight().to(self.adapter_dtype).reshape(-1)
        return flat.index_put((self.positions,), self.values, accumulate=True).reshape(self.out_features,
                                                                                      self.in_features)

    def merged_weight(self) -> torch.Tensor:
        return self.updated_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one matmul with W + ΔW: the sparse update costs an elementwise pass, not a second product
        weight = self.updated_weight()
        bias = self.base_layer.bias
        out = nn.functional.linear(self.adapter_input(x), weight, None if bias is None else bias.to(weight.dtype))
        return out.to(x.dtype)

    def penalty(self) -> torch.Tensor:
        return linalg.svdvals(self.delta_weight(), method="exact").sum()
