"""Planted-spike matrices: a Marchenko–Pastur bulk plus ``k`` known spikes, to check a bulk fit.

``W = X / √N + Σᵢ θᵢ uᵢ vᵢᵀ`` for an ``N × M`` (or ``M × N``) matrix, ``N = max``, ``c = M/N``:
``X`` has i.i.d. entries of unit variance — Gaussian, or Student-t with ``ν`` degrees of
freedom scaled by ``√((ν − 2)/ν)`` for a heavy-tailed bulk — and ``uᵢ, vᵢ`` are random unit
vectors. The noise alone has the MP law of unit scale (for ``ν > 4`` its largest eigenvalue
still converges to the edge ``(1 + √c)²``). A spike separates from the bulk when
``θ > c^(1/4)`` (the BBP transition); the strengths are log-spaced from ``2 c^(1/4)`` to
``max_strength``, so every planted spike is detectable and their sizes span a decade, as
the spikes of trained layers do.

>>> W = planted_matrix(300, 100, spikes=3, seed=0)
>>> [round(float(value), 1) for value in torch.linalg.svdvals(W)[:4] ** 2]   # bulk edge (1 + 1/√3)² ≈ 2.49
[400.8, 31.9, 4.0, 2.3]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SpectrakitError


def spike_strengths(rows: int, cols: int, spikes: int, max_strength: float = 20.0) -> list[float]:
    """The planted strengths ``θᵢ``: log-spaced from twice the BBP threshold ``c^(1/4)`` to ``max_strength``.

    Args:
        rows, cols: the matrix shape (``c = min / max``).
        spikes: how many.
        max_strength: the largest ``θ``.
    """
    low = 2 * (min(rows, cols) / max(rows, cols)) ** 0.25
    if spikes == 1:
        return [max_strength]
    return [low * (max_strength / low) ** (i / (spikes - 1)) for i in range(spikes)]


def planted_matrix(rows: int, cols: int, spikes: int, *, tail_index: float | None = None,
                   max_strength: float = 20.0, seed: int = 0) -> torch.Tensor:
    """A float64 ``rows × cols`` MP-noise matrix with ``spikes`` planted rank-one directions.

    Args:
        rows, cols: the shape.
        spikes: the number of planted spikes ``k`` (all above the BBP transition).
        tail_index: ``None`` for Gaussian noise, else Student-t noise with this many degrees
            of freedom (> 2; the MP edge holds for > 4).
        max_strength: the largest planted ``θ``.
        seed: the generator seed (the same seed gives the same matrix).
    """
    if tail_index is not None and not tail_index > 2:
        raise SpectrakitError(f"tail_index={tail_index!r} must be > 2 (finite variance)")
    rng = np.random.default_rng(seed)
    if tail_index is None:
        noise = rng.standard_normal((rows, cols))
    else:
        noise = rng.standard_t(tail_index, (rows, cols)) * math.sqrt((tail_index - 2) / tail_index)
    matrix = torch.from_numpy(noise / math.sqrt(max(rows, cols)))
    for strength in spike_strengths(rows, cols, spikes, max_strength):
        u = torch.from_numpy(rng.standard_normal(rows))
        v = torch.from_numpy(rng.standard_normal(cols))
        matrix += strength * torch.outer(u / u.norm(), v / v.norm())
    return matrix
