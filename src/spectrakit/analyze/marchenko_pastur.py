"""Marchenko–Pastur bulk of an ESD: its edge, the spikes above it, and the MP soft rank.

An ``N × M`` matrix (``N ≥ M``) of i.i.d. entries with variance ``s²/N`` has eigenvalues
of ``WᵀW`` spread over the Marchenko–Pastur bulk ``[s²(1 − 1/√Q)², s²(1 + 1/√Q)²]``,
``Q = N/M``, with mean ``s²``. Eigenvalues well above the upper edge ``λ₊`` are
*spikes*: structure the weights learned.

Like weightwatcher we first rescale the ESD to unit mean, and count spikes above
``λ₊ + √(Q^(−1/2) λ₊^(2/3) M^(−2/3))`` (a Tracy–Widom margin). The bulk scale ``s²`` is
estimated differently: weightwatcher brute-forces ``s`` against a kernel density
estimate; we alternate "``s²`` = mean of the eigenvalues inside the bulk" and
"bulk = eigenvalues below ``λ₊(s)``" until the bulk stops changing — the MP mean
identity, with no bandwidth to choose. ``num_spikes`` and ``mp_softrank = λ₊ / λ_max``
can therefore differ from weightwatcher's on spiky layers (see docs/diagnose.md).

>>> import torch
>>> torch.manual_seed(0) and None
>>> W = torch.randn(2000, 500, dtype=torch.float64) / 2000 ** 0.5
>>> W += 3 * torch.outer(torch.randn(2000, dtype=torch.float64), torch.randn(500, dtype=torch.float64)) / 2000
>>> fit = fit_marchenko_pastur(torch.linalg.svdvals(W) ** 2, rows=2000, cols=500)
>>> fit.num_spikes
1
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MarchenkoPasturFit:
    num_spikes: int
    mp_softrank: float  # λ₊ / λ_max, in (0, 1]: small when a few spikes dominate
    bulk_max: float     # λ₊ in the ESD's own units
    sigma_mp: float     # bulk scale s on the unit-mean ESD

    def as_row(self) -> dict[str, float | int]:
        return {"num_spikes": self.num_spikes, "mp_softrank": self.mp_softrank,
                "mp_bulk_max": self.bulk_max, "sigma_mp": self.sigma_mp}


def fit_marchenko_pastur(eigenvalues: torch.Tensor, *, rows: int, cols: int,
                         max_rounds: int = 50) -> MarchenkoPasturFit:
    """Fit the MP bulk of ``eigenvalues`` (the squared singular values of a ``rows × cols`` matrix)."""
    evals = eigenvalues.detach().to(torch.float64).flatten()
    big, small = max(rows, cols), min(rows, cols)
    aspect = big / small
    scale = evals.numel() / float(evals.sum())  # to unit mean, as weightwatcher does
    # Sorted ascending, the bulk {λ ≤ σ²·edge} is always a prefix, so each round of the
    # fixed-point iteration is one bisection and one prefix mean, on host floats.
    unit = torch.sort(evals * scale).values
    ascending, prefix_sums = unit.tolist(), torch.cumsum(unit, 0).tolist()
    lambda_max = ascending[-1]
    edge_factor = (1 + 1 / math.sqrt(aspect)) ** 2
    in_bulk = len(ascending)
    variance = 1.0
    for _ in range(max_rounds):
        variance = prefix_sums[in_bulk - 1] / in_bulk
        now_in_bulk = bisect.bisect_right(ascending, variance * edge_factor)
        if now_in_bulk == 0 or now_in_bulk == in_bulk:
            break
        in_bulk = now_in_bulk
    bulk_max = variance * edge_factor
    tracy_widom = aspect ** -0.5 * bulk_max ** (2 / 3) * small ** (-2 / 3)
    num_spikes = len(ascending) - bisect.bisect_right(ascending, bulk_max + math.sqrt(tracy_widom))
    return MarchenkoPasturFit(num_spikes=num_spikes, mp_softrank=min(1.0, bulk_max / lambda_max),
                              bulk_max=bulk_max / scale, sigma_mp=math.sqrt(variance))
