"""The x_min search of the power-law fit: the candidate with the smallest KS distance, found exactly.

For ascending eigenvalues ``λ₀ ≤ … ≤ λ_{N−1}``, candidate ``i`` (tail ``j ≥ i``, ``nᵢ = N − i``,
exponent ``αᵢ``) has the Kolmogorov–Smirnov distance

    Dᵢ = max_{j ≥ i} |eᵢ(j)|,     eᵢ(j) = hᵢ(j) − gᵢ(j),
    hᵢ(j) = (j − i)/nᵢ,           gᵢ(j) = 1 − (λⱼ/λᵢ)^(1−αᵢ),

between the empirical and the fitted CDF of the tail (what weightwatcher 0.7.7's ``WWFit``
computes, one candidate at a time). All ``Dᵢ`` together are ``N²/2`` terms. Only the
smallest one is needed, and both CDFs are non-decreasing in ``j`` (``αᵢ > 1``), so for
``a < j < b``

    hᵢ(a) − gᵢ(b)  ≤  eᵢ(j)  ≤  hᵢ(b) − gᵢ(a).

On ``K + 1`` points spread evenly over each tail, the largest ``|eᵢ|`` is a lower bound
``Lᵢ ≤ Dᵢ`` and the bounds between neighbouring points give an upper bound ``Uᵢ ≥ Dᵢ``.
Every candidate with ``Lᵢ > minₖ Uₖ`` cannot be the minimum and is dropped; the rest are
bounded again on a grid four times finer (``K`` = 16, 64, 256, 1024), and the few left
are evaluated on their whole tail. A tail of at most ``K + 1`` eigenvalues is covered by
the grid itself, so its bounds are its exact ``Dᵢ``. The values at the grid points are
the very terms of the full evaluation, so the winner, its ``D`` and the first-index
tie-break are those of the full ``N²/2`` pass — for about 1 % of its work on the pooled
ESDs of 8 192 eigenvalues of the CREPE conv layers (docs/benchmarks/realnets.md). Up to
320 eigenvalues one full pass is cheaper than the levels and is used instead.

>>> import torch
>>> logs = torch.linspace(0, 3, 50, dtype=torch.float64)
>>> alphas = torch.full((49,), 2.0, dtype=torch.float64)
>>> index, distance = best_candidate(logs, alphas, torch.ones(49, dtype=torch.bool))
>>> distances = tail_ks_distances(logs, alphas, torch.arange(49))
>>> index == int(distances.argmin()) and distance == float(distances.min())
True
"""

from __future__ import annotations

import math

import torch

# Tail points per candidate at each bounding level (each level 4× finer than the last).
_LEVELS = (16, 64, 256, 1024)
# Elements evaluated at once: a few arrays of this size stay in the CPU's cache.
_BLOCK_ELEMENTS = 1 << 18
# Up to this many eigenvalues one full pass costs less than the bounding levels' overhead.
_DIRECT_COUNT = 320
# Slack on the pruning test for the rounding of the bounds (≪ any real gap between distances).
_MARGIN = 1e-12


def tail_ks_distances(logs: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``Dᵢ`` over the whole tail ``j ≥ i`` for each candidate index ``i`` in ``candidates``.

    Args:
        logs: ``ln λ`` of the ascending eigenvalues (float64).
        alphas: the exponent ``αᵢ`` of every candidate ``i`` (indexed like ``logs``).
        candidates: ascending candidate indices (int64).
    """
    count = logs.numel()
    distances = torch.empty(candidates.numel(), dtype=torch.float64, device=logs.device)
    first = 0
    while first < candidates.numel():
        # a block of candidates looks at eigenvalues from its first candidate on
        start = int(candidates[first])
        stop = min(candidates.numel(), first + max(1, _BLOCK_ELEMENTS // (count - start)))
        rows = candidates[first:stop]
        # j < i: the ascending logs clamp the gap to 0 and the empirical term to 0, so e = 0
        gap = (logs[None, start:] - logs[rows, None]).clamp_min_(0)
        gap.mul_(1 - alphas[rows, None]).expm1_()  # = −gᵢ(j)
        j = torch.arange(start, count, dtype=torch.float64, device=logs.device)
        empirical = ((j[None, :] - rows[:, None]) / (count - rows)[:, None]).clamp_min_(0)
        distances[first:stop] = gap.add_(empirical).abs_().amax(dim=1)
        first = stop
    return distances


def _grid_bounds(logs: torch.Tensor, alphas: torch.Tensor, candidates: torch.Tensor,
                 points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, U)`` for each candidate from ``points + 1`` evenly spread points of its tail."""
    count = logs.numel()
    lower = torch.empty(candidates.numel(), dtype=torch.float64, device=logs.device)
    upper = torch.empty_like(lower)
    step = torch.arange(points + 1, dtype=torch.float64, device=logs.device)
    per_block = max(1, _BLOCK_ELEMENTS // (points + 1))
    for first in range(0, candidates.numel(), per_block):
        rows = candidates[first:first + per_block]
        tail = (count - rows)[:, None].to(torch.float64)
        # offsets round(k (n − 1)/K): 0 … n − 1, every offset once the tail has ≤ K + 1 points.
        # Integers in float64 (exact: K is a power of two), which divides faster than int64.
        offsets = step[None, :].mul(tail - 1).add_(points // 2).div_(points).floor_()
        gap = (logs[rows[:, None] + offsets.long()] - logs[rows, None]).clamp_min_(0)  # as the full pass
        fitted = gap.mul_(1 - alphas[rows, None]).expm1_().neg_()
        empirical = offsets / tail
        low = (empirical - fitted).abs_().amax(dim=1)
        between = torch.maximum(empirical[:, 1:] - fitted[:, :-1], fitted[:, 1:] - empirical[:, :-1])
        # neighbours with no eigenvalue between them add nothing beyond the points themselves
        between.masked_fill_(offsets[:, 1:] - offsets[:, :-1] <= 1, 0.0)
        lower[first:first + per_block] = low
        upper[first:first + per_block] = torch.maximum(between.amax(dim=1), low)
    return lower, upper


def best_candidate(logs: torch.Tensor, alphas: torch.Tensor, usable: torch.Tensor) -> tuple[int, float] | None:
    """``(i, Dᵢ)`` of the usable candidate with the smallest KS distance (the first one on ties).

    Args:
        logs: ``ln λ`` of the ``N`` ascending eigenvalues (float64).
        alphas: the exponents of candidates ``0 … N − 2``, each with ``αᵢ > 1`` where usable.
        usable: which candidates may be chosen (bool, like ``alphas``).

    Returns:
        None when no candidate is usable.
    """
    count = logs.numel()
    exact = torch.full((alphas.numel(),), math.inf, dtype=torch.float64, device=logs.device)
    open_ = torch.nonzero(usable).flatten()
    if open_.numel() == 0:
        return None
    threshold = math.inf
    for points in _LEVELS if count > _DIRECT_COUNT else ():
        if open_.numel() == 0:
            break
        lower, upper = _grid_bounds(logs, alphas, open_, points)
        threshold = min(threshold, float(upper.min()))
        covered = (count - open_) <= points + 1
        exact[open_[covered]] = lower[covered]
        open_ = open_[~covered & (lower <= threshold + _MARGIN)]
    if open_.numel():
        exact[open_] = tail_ks_distances(logs, alphas, open_)
    best = int(torch.argmin(exact))
    return best, float(exact[best])
