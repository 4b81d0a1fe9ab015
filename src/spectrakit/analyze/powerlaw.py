"""Power-law fit of the tail of an empirical spectral density (ESD).

For eigenvalues ``λ₁ ≤ … ≤ λ_N`` (thresholded at ``λ > thresh``) and each candidate
``x_min = λᵢ``, the continuous maximum-likelihood exponent of the tail ``λ ≥ x_min`` is

    α(x_min) = 1 + n / Σ_{λ ≥ x_min} ln(λ / x_min),        n = #{λ ≥ x_min},

and ``x_min`` is the candidate whose fitted CDF ``1 − (λ/x_min)^(1−α)`` is closest to the
empirical one in Kolmogorov–Smirnov distance ``D`` (Clauset, Shalizi & Newman, 2009).
Below 20 eigenvalues, weightwatcher switches to the bias-corrected
``α = 1 + (n − 1)/Σ ln(λ/x_min)`` and tails of at least 8 (its ``WWFit`` still picks
``x_min`` by ``D`` in the end); we do the same, so both the large- and the small-N fit
match weightwatcher 0.7.7's default.

``xmin="median"`` instead fixes ``x_min`` at the median eigenvalue (the upper half of
the ESD is the tail), the choice of TempBalance-style layer-wise analyses. It is
stable where the KS search is not — on noise-like spectra the KS distance is nearly
flat and its minimum jumps between tiny tails at the bulk edge — and is what FARMS
uses by default. A number fixes ``x_min`` at that value.

The search over ``x_min`` (:mod:`~spectrakit.analyze.ks_search`) bounds every candidate's
``D`` on coarse grids of its tail and evaluates in full only the few that could be the
minimum: the same ``x_min``, ``α`` and ``D`` as the full ``N²/2`` table, for a few per cent
of its work, which is most of why our ``alpha`` is cheaper than weightwatcher's loop.

>>> import torch
>>> torch.manual_seed(0) and None
>>> tail = (1 - torch.rand(4000, dtype=torch.float64)) ** (-1 / 2.5)   # Pareto, α = 3.5
>>> fit = fit_power_law(tail)
>>> abs(fit.alpha - 3.5) < 0.2
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpectrakitError
from .ks_search import best_candidate, tail_ks_distances

#: eigenvalues at or below this are treated as zero (weightwatcher's ``EVALS_THRESH``)
EVALS_THRESH = 1e-5
#: below this many eigenvalues, the small-N estimator is used (weightwatcher's cutoff)
SMALL_N = 20
_SMALL_N_MIN_TAIL = 8


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted tail: exponent, where it starts, its size and the KS distance."""

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    tail_size: int
    sigma: float  # standard error (α − 1)/√n

    @classmethod
    def failed(cls) -> PowerLawFit:
        nan = math.nan
        return cls(nan, nan, nan, nan, 0, nan)

    def as_row(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}alpha": self.alpha, f"{prefix}xmin": self.xmin, f"{prefix}xmax": self.xmax,
                f"{prefix}ks_distance": self.ks_distance, f"{prefix}num_pl_spikes": self.tail_size}


def fit_power_law(eigenvalues: torch.Tensor, *, xmin: str | float = "ks",
                  thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit ``p(λ) ∝ λ^(−α)`` for ``λ ≥ x_min`` with ``x_min`` chosen by the KS distance.

    Args:
        eigenvalues: the ESD, any order, any device (computed in float64).
        xmin: ``"ks"`` (weightwatcher's default), ``"median"``, or a fixed value.
        thresh: eigenvalues ``≤ thresh`` are dropped first, as weightwatcher does.

    Returns:
        A :class:`PowerLawFit`; all-NaN when fewer than two eigenvalues remain (a fixed
        ``xmin`` above all but one eigenvalue leaves no tail) or the spectrum is flat.
    """
    data = eigenvalues.detach().to(torch.float64).flatten()
    data = data[data > thresh].sort().values
    count = data.numel()
    if count < 2 or float(data[-1]) <= float(data[0]):
        return PowerLawFit.failed()
    if xmin == "median":
        return _fit_from(data, count // 2)
    if not isinstance(xmin, str):
        start = int(torch.searchsorted(data, torch.tensor(float(xmin), dtype=torch.float64)))
        if count - start < 2:  # x_min above all but one eigenvalue: no tail to fit
            return PowerLawFit.failed()
        return _fit_from(data, start)
    if xmin != "ks":
        raise SpectrakitError(f"xmin={xmin!r}: expected 'ks', 'median' or a number")
    if count < SMALL_N:
        return _fit(data, min_tail=_SMALL_N_MIN_TAIL, bias_corrected=True)
    return _fit(data, min_tail=2, bias_corrected=False)


def _fit_from(data: torch.Tensor, start: int) -> PowerLawFit:
    """The MLE exponent of the tail ``data[start:]`` (``x_min`` fixed)."""
    tail = data[start:]
    n = tail.numel()
    log_excess = float((tail / tail[0]).log().sum())
    if log_excess <= 1e-12:
        return PowerLawFit.failed()
    alpha = 1 + n / log_excess
    alphas = torch.tensor([alpha], dtype=torch.float64, device=tail.device)
    distance = float(tail_ks_distances(tail.log(), alphas, torch.zeros(1, dtype=torch.long, device=tail.device))[0])
    return PowerLawFit(alpha=alpha, xmin=float(tail[0]), xmax=float(tail[-1]), ks_distance=distance,
                       tail_size=n, sigma=(alpha - 1) / math.sqrt(n))


def _fit(data: torch.Tensor, *, min_tail: int, bias_corrected: bool) -> PowerLawFit:
    count = data.numel()
    logs = data.log()
    # Σ_{j ≥ i} ln λⱼ for each candidate i (candidates exclude the largest eigenvalue).
    suffix = logs.flip(0).cumsum(0).flip(0)[:-1]
    tail = torch.arange(count, 1, -1, dtype=torch.float64, device=data.device)  # n for each candidate
    log_excess = suffix - tail * logs[:-1]
    numerator = tail - 1 if bias_corrected else tail
    alphas = 1 + numerator / log_excess
    usable = (alphas > 1) & (tail >= min_tail) & (log_excess > 1e-12)
    found = best_candidate(logs, alphas, usable)
    if found is None:
        return PowerLawFit.failed()
    best, distance = found
    alpha = float(alphas[best])
    n = int(tail[best])
    return PowerLawFit(alpha=alpha, xmin=float(data[best]), xmax=float(data[-1]),
                       ks_distance=distance, tail_size=n, sigma=(alpha - 1) / math.sqrt(n))
