"""``sk.compress(model, method="monarch" | "btt", ratio=…)``: structured layers at low rank's budget.

Every targeted layer is replaced by a :class:`~spectrakit.compress.structured.MonarchLinear`
or :class:`~spectrakit.compress.structured.BlockTensorTrainLinear` holding at most the
weights that ``method="svd"`` would give it at the same ``ratio=``/``rank=`` (uniform
allocation), fitted to the weight by projection (each block's truncated SVD). A layer
where no such structure fits the budget stays dense.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="monarch", ratio=0.5)
>>> type(model[0]).__name__, report.layers["0"].parameters_after
('MonarchLinear', 2048)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._targets import module_sites, replace_module
from ..errors import SpectrakitError
from .allocation import LayerShape, allocate, check_budget
from .api import CompressionReport, LayerReport, _canonical_weight, count_parameters, find_layers
from .base import CompressionWarning
from .lowrank import low_rank_parameters
from .structured import build as build_structured
from .structured import choose_structure, structured_parameters


def compress_structured(model: nn.Module, method: str, *, ratio: float | None, rank: int | None,
                         energy: float | None, allocation: str | None, targets: str | Iterable[str],
                         only_if_smaller: bool, start: float, blocks: int | None = None,
                         **options: Any) -> CompressionReport:
    """``method="monarch"`` / ``"btt"`` for :func:`~spectrakit.compress.compress`: each target
    replaced by a structured layer holding at most the weights of the uniform low-rank choice.

    Args:
        model, method, ratio, rank, energy, allocation, targets, only_if_smaller: as for
            :func:`~spectrakit.compress.compress` (``energy`` and non-uniform allocations are refused).
        start: ``time.perf_counter()`` when the call began.
        blocks: a fixed number of blocks (default: see :func:`~spectrakit.compress.structured.choose_structure`).
        options: anything else, refused.
    """
    if options:
        raise SpectrakitError(f"method {method!r}: bad option ({', '.join(options)}); it takes blocks=")
    if energy is not None or allocation not in (None, "uniform"):
        raise SpectrakitError(f"method {method!r} takes ratio= or rank= with allocation='uniform' "
                              "(a structured layer has no spectrum to allocate by)")
    check_budget(ratio, rank, energy, "uniform")
    layers = find_layers(model, targets)
    matrices = {name: _canonical_weight(name, layer) for name, layer in layers.items()}
    parameters_before = count_parameters(model)
    shapes = {name: LayerShape(W.shape[0], W.shape[1], torch.zeros(min(W.shape), dtype=torch.float64))
              for name, W in matrices.items()}
    ranks = allocate(shapes, ratio=None if ratio is None else float(ratio), rank=None if rank is None else int(rank),
                     allocation="uniform")
    sites = module_sites(model)
    report_layers: dict[str, LayerReport] = {}
    for name, layer in layers.items():
        shape, W = shapes[name], matrices[name]
        budget_weights = low_rank_parameters(shape.in_features, shape.out_features, ranks[name])
        if blocks is not None:  # a size the given blocks do not divide is an error naming the layer
            try:
                choose_structure(method, shape.in_features, shape.out_features, budget_weights, blocks)
            except SpectrakitError as error:
                raise SpectrakitError(f"layer {name}: {error}") from None
        chosen = choose_structure(method, shape.in_features, shape.out_features, budget_weights, blocks)
        held = shape.dense if chosen is None else structured_parameters(shape.in_features, shape.out_features,
                                                                        *chosen)
        replace = chosen is not None and (not only_if_smaller or held < shape.dense)
        if replace:
            assert chosen is not None
            weight: torch.Tensor = layer.weight  # type: ignore[assignment]
            bias = getattr(layer, "bias", None)
            new = build_structured(method, W, *chosen, bias.detach() if isinstance(bias, torch.Tensor) else None,
                                   dtype=weight.dtype)
            replace_module(model, sites[id(layer)], new.to(weight.device))
        equivalent = chosen[0] * chosen[1] if replace and chosen is not None else shape.full_rank
        report_layers[name] = LayerReport(
            out_features=shape.out_features, in_features=shape.in_features, rank=equivalent,
            full_rank=shape.full_rank, replaced=replace, parameters_before=shape.dense,
            parameters_after=held if replace else shape.dense, truncation_loss=0.0, relative_loss=0.0)
    target_before = sum(r.parameters_before for r in report_layers.values())
    target_after = sum(r.parameters_after for r in report_layers.values())
    if ratio is not None:
        _warn_off_budget(method, float(ratio), report_layers, target_before, target_after)
    budget = {"ratio": ratio, "rank": rank, "blocks": blocks}
    return CompressionReport(
        method=method, allocation="uniform", budget={k: v for k, v in budget.items() if v is not None},
        parameters_before=parameters_before, parameters_after=parameters_before - target_before + target_after,
        target_parameters_before=target_before, target_parameters_after=target_after, layers=report_layers,
        seconds=time.perf_counter() - start)


#: how far above ``ratio`` the removed fraction may land before a warning (a structure comes in
#: steps of ``blocks·(in + out)`` weights, so an exact budget is rare)
_OVERSHOOT = 0.05


def _warn_off_budget(method: str, ratio: float, layers: dict[str, LayerReport], before: int, after: int) -> None:
    """One :class:`CompressionWarning` line when the structures could not spend ``ratio``'s budget:
    layers left dense (less removed than asked) or far fewer weights held than low rank would."""
    removed = 1 - after / max(before, 1)
    dense = [name for name, layer in layers.items() if not layer.replaced]
    if removed < ratio - 0.005 and dense:
        warnings.warn(f"{method}: ratio={ratio} is out of reach: {len(dense)} of {len(layers)} layers (e.g. "
                      f"{dense[0]}) have no {method} structure within their budget and stay dense, so only "
                      f"{removed:.1%} of the targeted weights were removed", CompressionWarning, stacklevel=4)
    elif removed > ratio + _OVERSHOOT:
        name, worst = max(((n, r) for n, r in layers.items() if r.replaced),
                          key=lambda item: item[1].parameters_before - item[1].parameters_after)
        limit = ("at most gcd(in, out) blocks of rank 1" if method == "monarch"
                 else "whole ranks per block, in steps of blocks·(in + out) weights")
        warnings.warn(f"{method}: ratio={ratio} is below what it can reach: a layer holds {limit}, so "
                      f"{removed:.1%} of the targeted weights were removed (e.g. {name}: {worst.parameters_after} "
                      f"of {worst.parameters_before} weights kept); "
                      + ("btt spends low rank's budget" if method == "monarch" else "try blocks= or rank="),
                      CompressionWarning, stacklevel=4)
