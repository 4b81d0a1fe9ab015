"""Asymmetric LoRA: a frozen random orthonormal A, only B trains (Zhu et al., 2024; seed 002),
with the disjoint slots of orthogonal adaptation (Po et al., 2023; seed 001).

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,     ΔW = s · B A,     s = α / r,
    A = rows ``slot·r … (slot+1)·r − 1`` of Q,   Q ∈ O(in) seeded by ``seed``,   B = 0.

``Q`` is the right-singular basis of a seeded Gaussian ``in × in`` matrix (Haar-random,
from ``spectrakit.linalg.svd``), so ``A Aᵀ = I`` and A is rebuilt bit for bit from
``seed`` on load: it is not saved. ``B = 0`` makes the layer exact at initialization.
Trainable parameters per layer: ``r · out``.

Adapters trained with the same ``seed`` and different ``slot``\\ s have mutually
orthogonal row spaces (``A_i A_jᵀ = 0``), so their updates sum without interference:
``(Σ_j ΔW_j) A_iᵀ = ΔW_i A_iᵀ`` for every ``i`` — each adapter acts on its own input
subspace exactly as it did alone (see :func:`spectrakit.adapt.merge_adapters`).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "asymmetric", rank=4)
>>> sk.trainable_parameters(model)
128
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, register
from .lora import add_low_rank


@functools.lru_cache(maxsize=32)
def _orthonormal_basis(size: int, seed: int) -> torch.Tensor:
    """A Haar-random ``size × size`` orthogonal matrix (rows orthonormal), cached per seed."""
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, _, Vh = linalg.svd(gaussian, method="exact")
    return Vh


def orthogonal_rows(size: int, rank: int, slot: int, seed: int) -> torch.Tensor:
    """Rows ``slot·rank … (slot+1)·rank − 1`` of the seeded orthogonal basis of ℝ^size (float64)."""
    return _orthonormal_basis(size, seed)[slot * rank:(slot + 1) * rank].clone()


@register
class AsymmetricLinear(AdaptedLinear):
    method = "asymmetric"
    options = ("alpha", "seed", "slot")
    lora_A: torch.Tensor
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 seed: int = 0, slot: int = 0, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.alpha, self.seed, self.slot = float(rank if alpha is None else alpha), int(seed), int(slot)
        self.scaling = self.alpha / rank
        self.new_buffer("lora_A", orthogonal_rows(self.in_features, rank, self.slot, self.seed))
        self.lora_B = self.new_parameter(torch.zeros(self.out_features, rank))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        slot = kwargs.get("slot", 0)
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0 or (slot + 1) * kwargs["rank"] > in_features:
            raise SpectrakitError(f"slot={slot!r}: layer {name} has room for {in_features // kwargs['rank']} "
                                  f"orthogonal slots of rank {kwargs['rank']} (in={in_features})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(self.base_layer(x), self.adapter_input(x), self.lora_A.T, self.lora_B.T, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)
