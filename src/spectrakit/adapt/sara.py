"""SaRA: train the smallest-magnitude weights, kept low-rank by a nuclear norm, with the
progressive re-selection of the paper (Hu et al., 2024; seeds 000, 001).

The ``k = round(fraction · out · in)`` entries of W with the smallest ``|w|`` (the
"temporarily ineffective" parameters; ``fraction = 0.1`` by default, the paper's 10–20 %)
form a fixed mask ``M`` with cut-off ``τ = max_{M} |w|``; their updates ``δ ∈ ℝᵏ`` train,
starting at zero:

    ΔW = scatter_M(δ),    W' = W + ΔW,    y = x W'ᵀ + b,
    adapter_penalty = ‖ΔW‖_*  (nuclear norm, ``spectrakit.linalg.svdvals``),

the nuclear norm being the paper's low-rank constraint on the sparse update.

**Progressive re-selection** (:func:`reselect_parameters`, the paper's progressive parameter
adjustment, called once part-way through training): an entry whose trained value
``|w + δ|`` has grown past ``τ`` has become effective and is frozen at that value; the entries
still below ``τ`` keep training (a new, smaller ``δ`` tensor, swapped into the optimizer). ``ΔW`` is unchanged by
the call, so the model's output is too; the trainable count drops to the entries kept.

The mask is recomputed from W on load (a stable sort, so the same W gives the same mask).
Before a re-selection only ``δ`` is saved; after one, also the frozen values and the indices
of the entries still training. Exact at initialization. Trainable parameters per layer:
``k`` (until a re-selection). Merges exactly. The paper's memory-saving backward (a
gradient kept only on the masked entries) is not needed here: ``δ`` is its own tensor, so
autograd already stores only ``k`` gradient entries; the dense ``gᵀx`` is formed transiently.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "sara", fraction=0.1)
>>> sk.trainable_parameters(model)
205
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, adapted_layers, register


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
    settled: torch.Tensor
    slots: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", fraction: float = 0.1,
                 kept: int | None = None, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.fraction = float(fraction)
        count = max(1, round(self.fraction * self.out_features * self.in_features))
        self.register_buffer("positions", smallest_entries(self.base_weight(), count), persistent=False)
        # after a re-selection (a loaded adapter says how many entries still train): `slots` are
        # the indices into `positions` that train, `settled` the frozen values of all k entries
        self.training_count = count if kept is None else int(kept)
        self.reselected = kept is not None
        device = self.positions.device
        self.register_buffer("slots", torch.arange(self.training_count, device=device), persistent=False)
        self.new_buffer("settled", torch.zeros(count if self.reselected else 0))
        self.values = self.new_parameter(torch.zeros(self.training_count))

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        fraction = kwargs.get("fraction", 0.1)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise SpectrakitError(f"fraction={fraction!r} must be in (0, 1]")

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"rank": self.rank, "fraction": self.fraction}
        if self.reselected:
            config["kept"] = self.training_count
        return config

    def trainable(self) -> dict[str, nn.Parameter]:
        tensors = super().trainable()
        if self.reselected:  # saved with δ: which entries still train, and the frozen values of the rest
            tensors["slots"] = cast(nn.Parameter, self.slots)
            tensors["settled"] = cast(nn.Parameter, self.settled)
        return tensors

    def threshold(self) -> torch.Tensor:
        """``τ``: the largest ``|w|`` of the mask (the selection's cut-off)."""
        return self.base_weight().detach().reshape(-1)[self.positions].abs().max()

    def _scatter(self, flat: torch.Tensor) -> torch.Tensor:
        if self.reselected:
            flat = flat.index_put((self.positions,), self.settled, accumulate=True)
        trained = self.positions[self.slots] if self.reselected else self.positions
        return flat.index_put((trained,), self.values, accumulate=True).reshape(self.out_features,
                                                                               self.in_features)

    def delta_weight(self) -> torch.Tensor:
        return self._scatter(torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype,
                                         device=self.values.device))

    def updated_weight(self) -> torch.Tensor:
        """``W + ΔW`` as scatter-adds into a copy of W (differentiable in ``δ``)."""
        return self._scatter(self.base_weight().to(self.adapter_dtype).reshape(-1))

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

    @torch.no_grad()
    def reselect(self) -> int:
        """Freeze the entries whose ``|w + δ|`` passed ``τ``; keep training the rest. Returns the count kept."""
        full = torch.zeros(len(self.positions), dtype=self.values.dtype, device=self.values.device)
        if self.reselected:
            full += self.settled
        full[self.slots if self.reselected else torch.arange(len(self.positions), device=full.device)] += self.values
        current = self.base_weight().reshape(-1)[self.positions].to(full.dtype) + full
        keep = torch.nonzero(current.abs() <= self.threshold().to(full.dtype)).reshape(-1)
        settled = full.clone()
        settled[keep] = 0
        self.settled = settled
        self.slots = keep.to(self.slots.device)
        # a new tensor, not a resized one: autograd caches a leaf's shape in its gradient accumulator
        self.values = self.new_parameter(full[keep])
        self.training_count, self.reselected = int(keep.numel()), True
        return self.training_count


def reselect_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """SaRA's progressive step in every ``sara`` layer of ``model``; returns the entries still training.

    Args:
        model: a model adapted with ``"sara"``.
        optimizer: the optimizer training it: each layer's ``δ`` is a new, smaller tensor, which
            replaces the old one in the optimizer's param groups (its state is dropped). Without
            it, build the optimizer again after the call.
    """
    layers = [layer for layer in adapted_layers(model).values() if isinstance(layer, SaRALinear)]
    if not layers:
        raise SpectrakitError("reselect_parameters: the model has no 'sara' adapters")
    kept = 0
    for layer in layers:
        old = layer.values
        kept += layer.reselect()
        if optimizer is not None:
            optimizer.state.pop(old, None)
            for group in optimizer.param_groups:
                group["params"] = [layer.values if p is old else p for p in group["params"]]
    return kept
