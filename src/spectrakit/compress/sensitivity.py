"""ASVD's sensitivity-based rank search (Yuan et al., 2023): ranks from the calibration loss.

Each layer is truncated on its own, the rest of the model kept dense, to each candidate
fraction ``p`` of its dense weights (ASVD: ``p ∈ {0.1, 0.2, …, 0.9}``, rank
``k = ⌊p·in·out/(in + out)⌋``), and the calibration loss is measured: ``ℓ(layer, p)``. A
threshold ``τ`` then gives each layer the smallest ``p`` with ``ℓ(layer, p) ≤ τ`` (dense if
none); ``τ`` is the smallest one — a bisection over the measured losses — whose ranks fit
the budget. A layer whose truncation hurts the loss most is therefore the one that keeps
the most rank, whatever its singular values say. It costs ``layers × candidates`` passes
over the calibration batches (forwards only); ``search_batches=`` uses only the first few.

Chosen with ``allocation="sensitivity"``, for any method (ASVD's own is ``method="asvd"``).

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
>>> batches = [torch.randn(64, 32) for _ in range(2)]
>>> loss = lambda model, x: model(x).square().mean()
>>> report = sk.compress(model, method="asvd", ratio=0.5, calibration=batches, allocation="sensitivity",
...                      loss_fn=loss)
>>> report.ratio >= 0.5
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._targets import replace_module
from .allocation import LayerShape
from .base import Spectrum
from .lowrank import LowRankLinear

CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
                     ) -> float:
    """Mean of ``loss_fn(model, batch)`` over ``batches``, in eval mode.

    Args:
        model: the model.
        batches: calibration batches.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
    """
    was_training = model.training
    model.eval()
    try:
        return sum(float(loss_fn(model, batch)) for batch in batches) / max(len(batches), 1)
    finally:
        model.train(was_training)


def candidate_rank(layer: LayerShape, fraction: float) -> int:
    """The rank holding ``fraction`` of the layer's dense weights (at least 1)."""
    k = math.floor(fraction * layer.dense / (layer.in_features + layer.out_features) + 1e-9)
    return max(1, min(k, layer.full_rank))


def sensitivity_ranks(model: nn.Module, layers: dict[str, nn.Module], sites: dict[int, Any],
                      spectra: dict[str, Spectrum], shapes: dict[str, LayerShape], batches: Sequence[Any],
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor], budget: int,
                      candidates: Sequence[float] = CANDIDATES, only_if_smaller: bool = True) -> dict[str, int]:
    """Ranks holding at most ``budget`` weights, chosen by the calibration loss (module docstring).

    Args:
        model: the model, dense; each layer is swapped out and back in turn.
        layers: the targets by name; ``sites``: :func:`spectrakit._targets.module_sites` of the model.
        spectra, shapes: each target's decomposition and shape.
        batches: the calibration batches to measure the loss on.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        budget: the weights the targets may hold in all.
        candidates: the fractions of each layer's dense weights to try, in (0, 1).
        only_if_smaller: a layer above its break-even rank counts as dense.
    """
    table: dict[str, list[tuple[float, int]]] = {}  # layer -> (loss, rank) per candidate, smallest rank first
    for name, layer in layers.items():
        site = sites[id(layer)]
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        bias = getattr(layer, "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        rows = []
        for rank in sorted({candidate_rank(shapes[name], p) for p in candidates}):
            up, down = spectra[name].factors(rank, dtype=weight.dtype)
            trial = LowRankLinear.from_factors(up, down, bias, dtype=weight.dtype).to(weight.device)
            replace_module(model, site, trial)
            try:
                rows.append((calibration_loss(model, batches, loss_fn), rank))
            finally:
                replace_module(model, site, layer)
        table[name] = rows

    def ranks_at(threshold: float) -> dict[str, int]:
        chosen = {}
        for name, rows in table.items():
            fits = [rank for loss, rank in rows if loss <= threshold]
            chosen[name] = min(fits) if fits else shapes[name].full_rank
        return chosen

    def cost(ranks: dict[str, int]) -> int:
        return sum(shapes[name].cost(k, only_if_smaller) for name, k in ranks.items())

    thresholds = sorted({loss for rows in table.values() for loss, _ in rows})
    if not thresholds:
        return {}
    # the smallest threshold whose ranks fit: cost falls as the threshold rises
    low, high = 0, len(thresholds) - 1
    if cost(ranks_at(thresholds[high])) > budget:
        return ranks_at(thresholds[high])  # even the smallest candidates overshoot; the caller warns
    while low < high:
        middle = (low + high) // 2
        if cost(ranks_at(thresholds[middle])) <= budget:
            high = middle
        else:
            low = middle + 1
    return ranks_at(thresholds[low])
