"""Rank allocation: how many singular components each layer keeps.

A layer of shape ``out × in`` at rank ``k`` costs ``k·(in + out)`` weights while
``k ≤ k_max = ⌊(in·out − 1)/(in + out)⌋`` (:func:`break_even_rank`) and is kept dense
(``in·out``) above it. A budget can be set three ways:

* ``ratio=ρ`` — remove the fraction ``ρ`` of the targeted weights: keep ``(1 − ρ)·Σ in·out``;
* ``rank=k`` — the same rank everywhere (capped at each layer's ``min(in, out)``);
* ``energy=e`` — per layer, the smallest ``k`` whose kept ``Σσᵢ²`` is at least ``e`` of the total.

``allocation="uniform"`` applies the choice to each layer on its own (with ``ratio``,
every layer loses the same fraction of its weights: ``k = ⌊(1 − ρ)·in·out/(in + out)⌋``).
``allocation="global"`` spends the same total budget where it buys the most: starting
from rank 1 everywhere, components are taken greedily by marginal loss per parameter,
``σᵢ² / (in + out)`` with ``σᵢ²`` the method's loss for component ``i`` (for ``svd-llm``
the exact output error), until the budget is spent; a layer that reaches ``k_max``
becomes dense again, which refunds its overshoot. Because each layer's ``σ`` are sorted,
the greedy choice is a prefix per layer, and it is optimal for the linearized problem
up to the last component (a knapsack of equal-cost items).

``allocation="heterogeneous"`` is SVD-LLM V2's rule (:func:`heterogeneous_ratios`): the
layers of one type (same name up to layer indices, same shape) share that type's budget;
each one's ratio falls with its theoretical truncation loss at the uniform rank.
``allocation="sensitivity"`` is ASVD's search (:mod:`spectrakit.compress.sensitivity`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import torch

from ..errors import SpectrakitError
from .lowrank import break_even_rank, low_rank_parameters

ALLOCATIONS = ("uniform", "global", "heterogeneous", "sensitivity")


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int
    losses: torch.Tensor  # σᵢ², descending, float64

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def cost(self, rank: int, only_if_smaller: bool = True) -> int:
        """Weights the layer holds at ``rank`` (dense above break-even when ``only_if_smaller``)."""
        if only_if_smaller and rank > break_even_rank(self.in_features, self.out_features):
            return self.dense
        return low_rank_parameters(self.in_features, self.out_features, rank)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_budget(ratio: float | None, rank: int | None, energy: float | None, allocation: str) -> None:
    """Validate the budget options before any work is done."""
    given = [name for name, value in (("ratio", ratio), ("rank", rank), ("energy", energy)) if value is not None]
    if len(given) != 1:
        raise SpectrakitError("compress: give exactly one of ratio=, rank= or energy= "
                              f"(got {', '.join(given) or 'none'})")
    if allocation not in ALLOCATIONS:
        raise SpectrakitError(f"allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    # numbers.Real / Integral: numpy scalars are welcome too
    if ratio is not None and not (_is_real(ratio) and 0 < ratio < 1 and math.isfinite(ratio)):
        raise SpectrakitError(f"ratio={ratio!r} must be in (0, 1): the fraction of the targeted weights to remove")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise SpectrakitError(f"rank={rank!r} must be an integer >= 1")
    if energy is not None and not (_is_real(energy) and 0 < energy <= 1):
        raise SpectrakitError(f"energy={energy!r} must be in (0, 1]: the fraction of Σσ² to keep")


def uniform_ranks(layers: dict[str, LayerShape], ratio: float | None, rank: int | None,
                  energy: float | None) -> dict[str, int]:
    """Each layer's rank chosen on its own (see the module docstring)."""
    ranks = {}
    for name, layer in layers.items():
        if ratio is not None:
            k = math.floor((1 - ratio) * layer.dense / (layer.in_features + layer.out_features))
        elif rank is not None:
            k = rank
        else:
            if energy is None:  # check_budget lets exactly one of the three through
                raise SpectrakitError("compress: give exactly one of ratio=, rank= or energy=")
            total = float(layer.losses.sum())
            if total <= 0:
                k = 1
            else:
                kept = torch.cumsum(layer.losses, 0) / total
                k = int(torch.searchsorted(kept, torch.tensor(energy * (1 - 1e-12), dtype=kept.dtype))) + 1
        ranks[name] = max(1, min(k, layer.full_rank))
    return ranks


def global_ranks(layers: dict[str, LayerShape], budget: int, only_if_smaller: bool = True) -> dict[str, int]:
    """Greedy ranks holding at most ``budget`` weights in all, by marginal loss per parameter."""
    names = list(layers)
    ranks = {name: 1 for name in names}
    spent = sum(layers[name].cost(1, only_if_smaller) for name in names)
    scores, owners, index = [], [], []
    for position, name in enumerate(names):
        layer = layers[name]
        losses = layer.losses[1:layer.full_rank].double()
        scores.append(losses / (layer.in_features + layer.out_features))
        owners.append(torch.full((losses.numel(),), position, dtype=torch.long))
        index.append(torch.arange(2, losses.numel() + 2))
    if not scores:
        return ranks
    order = torch.argsort(torch.cat(scores), descending=True, stable=True)
    owners_all, index_all = torch.cat(owners)[order].tolist(), torch.cat(index)[order].tolist()
    dense: set[str] = set()
    for position, k in zip(owners_all, index_all):
        name = names[position]
        if name in dense or k != ranks[name] + 1:
            continue  # already dense, or (ties) not the next component of that layer
        layer = layers[name]
        extra = layer.cost(k, only_if_smaller) - layer.cost(k - 1, only_if_smaller)
        if spent + extra > budget:
            continue  # a cheaper layer's next component may still fit
        spent += extra
        ranks[name] = k
        if only_if_smaller and k > break_even_rank(layer.in_features, layer.out_features):
            dense.add(name)
            ranks[name] = layer.full_rank
    return ranks


def _zero_tail(losses: torch.Tensor) -> float:
    """The tail ``Σ_{i≥k} σᵢ²`` below which a truncation loss counts as zero: rounding of a
    float64 Gram eigensolve (as :func:`spectrakit.compress.svd_llm._rank`)."""
    n = max(losses.numel(), 1)
    return max(32.0, 8.0 * n ** 0.5) * torch.finfo(torch.float64).eps * float(losses.sum())


def layer_type(name: str, layer: LayerShape) -> str:
    """The type a layer shares with others (``model.layers.3.mlp.up_proj`` → ``model.layers.#.mlp.up_proj``
    and its shape), for :func:`heterogeneous_ratios`."""
    return f"{re.sub(r'[0-9]+', '#', name)}:{layer.out_features}x{layer.in_features}"


def heterogeneous_ratios(layers: dict[str, LayerShape], ratio: float) -> dict[str, float]:
    """Per-layer ratios after SVD-LLM V2: within each type (:func:`layer_type`), a layer's
    ratio is proportional to ``1 / log(e · Lᵢ / L_min)``, with ``Lᵢ = (Σ_{j>k} σⱼ²)^{1/2}`` its
    theoretical truncation loss at the uniform rank ``k`` and ``L_min`` the type's smallest
    nonzero one (the paper normalizes the inverse of the log loss; scaling by ``e / L_min``
    first makes every logarithm at least 1, whatever the losses' units, so the spread of the
    ratios grows only with the log of the losses' spread), and clipped to what the layer can take: no
    less than 0 (dense) and no more than the smallest rank at which its loss stays within the
    type's largest loss at the uniform rank — or, for a layer whose loss is zero, the rank
    where its loss stays zero. (A loss measured at the uniform rank says nothing about the
    loss far below it: without that cap a layer whose inputs span few directions, nearly
    lossless at the uniform rank, was sent to rank 1.) The clipped ratios are rescaled (a bisection on the
    common factor) so that each type's ratios, weighted by the layers' sizes, average
    ``ratio`` exactly; so do all the layers' (when every type can reach ``ratio``).

    Args:
        layers: each layer's shape and ``σᵢ²`` (descending), by name.
        ratio: the global fraction of the weights to remove, in (0, 1).
    """
    groups: dict[str, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(layer_type(name, layer), []).append(name)
    ratios: dict[str, float] = {}
    for names in groups.values():
        loss, lowest, highest, uniform = {}, {}, {}, {}
        for name in names:
            layer = layers[name]
            span = layer.in_features + layer.out_features
            k = uniform[name] = max(1, min(math.floor((1 - ratio) * layer.dense / span), layer.full_rank))
            tail = float(layer.losses[k:].sum())
            loss[name] = 0.0 if tail <= _zero_tail(layer.losses) else math.sqrt(tail)
        worst = max(loss.values()) ** 2  # the type's largest truncation loss (squared) at the uniform rank
        for name in names:
            layer = layers[name]
            span = layer.in_features + layer.out_features
            # the smallest rank whose loss stays within the type's worst at the uniform rank (zero for a
            # zero-loss type): the loss at the uniform rank says nothing about the loss far below it
            tails = torch.flip(torch.cumsum(torch.flip(layer.losses, [0]), 0), [0])  # tails[i] = Σ_{j≥i}
            if loss[name] > 0:  # its own loss at the uniform rank is within the worst by definition (the
                # cumulative sums round differently from the tail above, hence the min and the margin)
                floor_rank = min(uniform[name], int((tails > worst * (1 + 1e-9)).sum()))
            else:
                floor_rank = int((tails > _zero_tail(layer.losses)).sum())
            floor_rank = max(1, floor_rank)
            lowest[name] = 0.0
            highest[name] = max(0.0, 1 - span * floor_rank / layer.dense)
        sizes = {name: layers[name].dense for name in names}
        target = ratio * sum(sizes.values())
        finite = [loss[n] for n in names if loss[n] > 0]
        smallest = min(finite) if finite else 1.0
        score = {n: (math.inf if loss[n] == 0 else 1 / (1 + math.log(loss[n] / smallest))) for n in names}

        def spread(scale: float, score: dict[str, float] = score, lowest: dict[str, float] = lowest,
                   highest: dict[str, float] = highest) -> dict[str, float]:
            return {n: min(highest[n], max(lowest[n], scale * score[n] if score[n] < math.inf else highest[n]))
                    for n in score}

        def removed(values: dict[str, float], sizes: dict[str, int] = sizes) -> float:
            return sum(values[n] * sizes[n] for n in values)

        if not finite:  # every loss is zero: each layer down to its own lossless rank, if the type allows
            chosen = {n: min(highest[n], ratio) for n in names} if removed(highest) >= target else dict(highest)
        elif removed(highest) <= target:
            chosen = dict(highest)  # the type cannot reach the ratio; the caller warns
        else:
            low, high = 0.0, 1.0
            while removed(spread(high)) < target:
                high *= 2
            for _ in range(200):
                middle = (low + high) / 2
                low, high = (middle, high) if removed(spread(middle)) < target else (low, middle)
            chosen = spread(high)
            # the bisection's last rounding, put on the layers strictly inside their bounds
            free = [n for n in names if lowest[n] < chosen[n] < highest[n]]
            if free:
                excess = (removed(chosen) - target) / sum(sizes[n] for n in free)
                for n in free:
                    chosen[n] = min(highest[n], max(lowest[n], chosen[n] - excess))
        ratios.update(chosen)
    return ratios


def heterogeneous_ranks(layers: dict[str, LayerShape], ratio: float) -> dict[str, int]:
    """Integer ranks from :func:`heterogeneous_ratios`: ``⌊(1 − ρᵢ)·in·out/(in + out)⌋``."""
    ranks = {}
    for name, share in heterogeneous_ratios(layers, ratio).items():
        layer = layers[name]
        k = math.floor((1 - share) * layer.dense / (layer.in_features + layer.out_features) + 1e-9)
        ranks[name] = max(1, min(k, layer.full_rank))
    return ranks


def budget_ratio(layers: dict[str, LayerShape], ratio: float | None, rank: int | None, energy: float | None,
                 only_if_smaller: bool = True) -> float:
    """The fraction of the weights a budget removes (``rank=``/``energy=``: what the uniform choice spends)."""
    if ratio is not None:
        return ratio
    uniform = uniform_ranks(layers, ratio, rank, energy)
    dense = sum(layer.dense for layer in layers.values())
    spent = sum(layers[name].cost(k, only_if_smaller) for name, k in uniform.items())
    return min(max(1 - spent / max(dense, 1), 0.0), 1 - 1e-12)


def allocate(layers: dict[str, LayerShape], *, ratio: float | None = None, rank: int | None = None,
             energy: float | None = None, allocation: str = "uniform",
             only_if_smaller: bool = True) -> dict[str, int]:
    """Ranks for every layer under the budget that ``ratio`` / ``rank`` / ``energy`` sets.

    With ``allocation="global"`` and ``rank=``/``energy=``, the budget is what the uniform
    choice would spend, redistributed.
    """
    check_budget(ratio, rank, energy, allocation)
    if allocation == "sensitivity":
        raise SpectrakitError("allocation='sensitivity' runs the model: it is chosen inside compress()")
    uniform = uniform_ranks(layers, ratio, rank, energy)
    if allocation == "uniform":
        return uniform
    if allocation == "heterogeneous":
        return heterogeneous_ranks(layers, budget_ratio(layers, ratio, rank, energy, only_if_smaller))
    if ratio is not None:
        budget = math.floor((1 - ratio) * sum(layer.dense for layer in layers.values()))
    else:
        budget = sum(layers[name].cost(k, only_if_smaller) for name, k in uniform.items())
    return global_ranks(layers, budget, only_if_smaller)
