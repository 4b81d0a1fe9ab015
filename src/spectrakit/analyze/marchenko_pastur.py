"""Marchenko–Pastur bulk of an ESD: its edge, the spikes above it, and the MP soft rank.

An ``N × M`` matrix (``N ≥ M``) of i.i.d. entries with variance ``s²/N`` has eigenvalues
of ``WᵀW`` spread over the Marchenko–Pastur bulk ``[s²(1 − 1/√Q)², s²(1 + 1/√Q)²]``,
``Q = N/M``, with mean ``s²``. Eigenvalues well above the upper edge ``λ₊`` are
*spikes*: structure the weights learned.

Like weightwatcher we first rescale the ESD to unit mean, and count spikes above
``λ₊ + √(Q^(−1/2) λ₊^(2/3) M^(−2/3))`` (a Tracy–Widom margin). The fits differ in how they
estimate the bulk scale ``s²``:

* ``"quantile"`` (the default, :func:`fit_marchenko_pastur`): match the lower half of the
  sorted ESD to the MP quantile function ``F⁻¹_Q`` of unit scale by least squares through the
  origin, ``s² = Σ λ₍ᵢ₎ qᵢ / Σ qᵢ²`` over ``i ≤ n/2`` with ``qᵢ = F⁻¹_Q((i − ½)/n)``. Spikes
  and heavy tails live at the top of the ESD; the lower half is bulk as long as fewer than
  half the eigenvalues are not, so the estimate has a 50 % breakdown point and no feedback
  from the spike count.
* ``"iterative"`` (:func:`fit_marchenko_pastur_iterative`, the previous default): alternate
  "``s²`` = mean of the eigenvalues inside the bulk" and "bulk = eigenvalues below ``λ₊(s)``".
  Exact on an MP bulk with separated spikes, but it collapses on heavy-tailed trained
  spectra: with no gap between bulk and tail, the truncated mean stays below
  ``λ₊ / (1 + 1/√Q)²`` for every cut, so each round lowers the edge, drops more of the tail and
  lowers the mean again, until only the smallest eigenvalues are left "in the bulk".
* ``"weightwatcher"`` (:func:`fit_marchenko_pastur_weightwatcher`): weightwatcher 0.7.7's
  ``mp_fit`` procedure, written from its formulas, for parity.

See docs/diagnose.md and docs/benchmarks/mp_fit.md for the spike-count errors of each on
planted spectra and the counts on trained networks.

>>> import torch
>>> torch.manual_seed(0) and None
>>> W = torch.randn(2000, 500, dtype=torch.float64) / 2000 ** 0.5
>>> W += 3 * torch.outer(torch.randn(2000, dtype=torch.float64), torch.randn(500, dtype=torch.float64)) / 2000
>>> fit = fit_marchenko_pastur(torch.linalg.svdvals(W) ** 2, rows=2000, cols=500)
>>> fit.num_spikes, round(fit.sigma_mp, 2)
(1, 1.0)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SpectrakitError


@dataclass(frozen=True)
class MarchenkoPasturFit:
    """One bulk fit: the spike count, ``λ₊ / λ_max``, ``λ₊`` in the ESD's units and ``s``."""

    num_spikes: int
    mp_softrank: float  # λ₊ / λ_max, in (0, 1]: small when a few spikes dominate
    bulk_max: float     # λ₊ in the ESD's own units
    sigma_mp: float     # bulk scale s on the unit-mean ESD

    def as_row(self) -> dict[str, float | int]:
        """The fit as table columns (``num_spikes``, ``mp_softrank``, ``mp_bulk_max``, ``sigma_mp``)."""
        return {"num_spikes": self.num_spikes, "mp_softrank": self.mp_softrank,
                "mp_bulk_max": self.bulk_max, "sigma_mp": self.sigma_mp}


def _spikes_above(ascending: list[float], bulk_max: float, aspect: float, small: int) -> int:
    """Eigenvalues (unit-mean ESD, ascending) above ``λ₊`` plus weightwatcher's Tracy–Widom margin."""
    tracy_widom = aspect ** -0.5 * bulk_max ** (2 / 3) * small ** (-2 / 3)
    return len(ascending) - bisect.bisect_right(ascending, bulk_max + math.sqrt(tracy_widom))


_QUANTILE_GRID = 4097


def mp_quantiles(aspect: float, levels: np.ndarray) -> np.ndarray:
    """The Marchenko–Pastur quantile function of unit scale (mean 1) at ``levels`` in [0, 1].

    Args:
        aspect: ``Q = N / M ≥ 1``; the law lives on ``[(1 − 1/√Q)², (1 + 1/√Q)²]``.
        levels: probabilities.

    The CDF is tabulated on ``λ = a + (b − a)(1 − cos t)/2``, ``t ∈ [0, π]``, which turns the
    square-root edges (and the ``1/√λ`` pole at ``Q = 1``) into a smooth integrand, so the
    trapezoid rule on a uniform ``t`` grid is accurate; quantiles are interpolated from it.

    >>> [round(float(q), 3) for q in mp_quantiles(1.0, np.array([0.5, 1.0]))]
    [0.653, 4.0]
    """
    ratio = 1.0 / aspect
    lower, upper = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    t = np.linspace(0.0, math.pi, _QUANTILE_GRID)
    lam = lower + (upper - lower) * (1 - np.cos(t)) / 2
    half_width = (upper - lower) * np.sin(t) / 2          # = √((b − λ)(λ − a)) = dλ/dt
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = half_width * half_width / (2 * math.pi * ratio * lam)
    if lower == 0.0:  # Q = 1: (b sin t / 2)² / λ → b as t → 0
        integrand[0] = upper / (2 * math.pi * ratio)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2)])
    return np.interp(levels, cdf / cdf[-1], lam)


def fit_marchenko_pastur(eigenvalues: torch.Tensor, *, rows: int, cols: int,
                         bulk_fraction: float = 0.5) -> MarchenkoPasturFit:
    """Fit the MP bulk scale to the lower quantiles of ``eigenvalues`` (the default fit).

    Args:
        eigenvalues: the squared singular values of a ``rows × cols`` matrix (any order).
        rows, cols: the matrix's shape (only ``Q = max/min`` and ``min`` matter).
        bulk_fraction: the share of the smallest eigenvalues matched to the MP quantiles,
            in (0, 1]; the fit tolerates up to ``1 − bulk_fraction`` of the ESD being spikes.

    ``s² = Σ λ₍ᵢ₎ qᵢ / Σ qᵢ²`` over the ``⌈bulk_fraction · n⌉`` smallest eigenvalues of the
    unit-mean ESD, ``qᵢ = F⁻¹_Q((i − ½)/n)``; ``λ₊ = s²(1 + 1/√Q)²``. A matrix whose lower
    quantiles are all zero (rank at most ``(1 − bulk_fraction) · n``) has no noise bulk:
    ``s = 0`` and every eigenvalue above float32 round-off (``λ > λ_max (max(N, M) ε)²``) counts.
    """
    if not 0.0 < bulk_fraction <= 1.0:
        raise SpectrakitError(f"bulk_fraction={bulk_fraction!r} must be in (0, 1]")
    evals = eigenvalues.detach().to(torch.float64).flatten().cpu()
    big, small = max(rows, cols), min(rows, cols)
    aspect = big / small
    count = evals.numel()
    scale = count / float(evals.sum())  # to unit mean, as weightwatcher does
    unit = np.sort(evals.numpy() * scale)
    matched = max(1, math.ceil(bulk_fraction * count))
    levels = (np.arange(matched) + 0.5) / count
    quantiles = mp_quantiles(aspect, levels)
    variance = max(0.0, float(np.dot(unit[:matched], quantiles) / np.dot(quantiles, quantiles)))
    ascending = unit.tolist()
    lambda_max = ascending[-1]
    bulk_max = variance * (1 + 1 / math.sqrt(aspect)) ** 2
    round_off = lambda_max * (big * float(torch.finfo(torch.float32).eps)) ** 2
    if bulk_max > round_off:
        num_spikes = _spikes_above(ascending, bulk_max, aspect, small)
    else:  # the lower quantiles are zeros of a low-rank matrix: no noise bulk to fit
        variance = bulk_max = 0.0
        num_spikes = count - bisect.bisect_right(ascending, round_off)
    return MarchenkoPasturFit(num_spikes=num_spikes, mp_softrank=min(1.0, bulk_max / lambda_max),
                              bulk_max=bulk_max / scale, sigma_mp=math.sqrt(variance))


def fit_marchenko_pastur_iterative(eigenvalues: torch.Tensor, *, rows: int, cols: int,
                                   max_rounds: int = 50) -> MarchenkoPasturFit:
    """The bulk-mean fixed point (``mp_fit="iterative"``; collapses on heavy-tailed spectra).

    Args:
        eigenvalues: the squared singular values of a ``rows × cols`` matrix.
        rows, cols: the matrix's shape.
        max_rounds: cap on the alternations of "``s²`` = bulk mean" and "bulk = λ ≤ λ₊(s)".
    """
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
    num_spikes = _spikes_above(ascending, bulk_max, aspect, small)
    return MarchenkoPasturFit(num_spikes=num_spikes, mp_softrank=min(1.0, bulk_max / lambda_max),
                              bulk_max=bulk_max / scale, sigma_mp=math.sqrt(variance))


# ----- weightwatcher 0.7.7 compatible fit ----------------------------------------------------------
_KDE_BANDWIDTH = 0.1      # weightwatcher's bw
_KDE_GRID = 1000          # density grid on [0, max + 0.5]
_DENSITY_FLOOR = 0.01     # grid points with a lower density are left out of the residual
_BAD_EDGE_PENALTY = 1000.0


def _linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """1-D linear-kernel density, normalized as scikit-learn's ``KernelDensity(kernel="linear")``:
    ``(1 / (n h)) Σ max(0, 1 − |x − xᵢ| / h)``."""
    density = np.empty_like(grid)
    chunk = max(1, 4_000_000 // max(1, samples.size))
    for start in range(0, grid.size, chunk):
        x = grid[start:start + chunk, None]
        density[start:start + chunk] = np.clip(1.0 - np.abs(x - samples[None, :]) / bandwidth, 0.0, None).sum(1)
    return density / (samples.size * bandwidth)


def _mp_residual_factory(to_fit: np.ndarray, aspect: float) -> Callable[[np.ndarray], float]:
    """Sum of squared residuals of the MP (or, at Q = 1, quarter-circle) density against the
    KDE of ``to_fit``, as a function of ``s``; bad bulk edges cost ``1000²`` per grid point."""
    grid = np.linspace(0, np.max(to_fit) + 0.5, _KDE_GRID)
    density = _linear_kde(to_fit, grid, _KDE_BANDWIDTH)
    keep = density > _DENSITY_FLOOR
    x, y = grid[keep], density[keep]
    if x.size == 0:
        return lambda sigma: 0.0
    peak, right = x[np.argmax(y)], np.max(x)
    inverse_aspect = 1 / aspect

    def residual(p: np.ndarray) -> float:
        sigma = float(np.asarray(p, dtype=np.float64).ravel()[0])
        with np.errstate(all="ignore"):
            if aspect == 1:
                model = np.nan_to_num(1 / (np.pi * sigma * sigma) * np.sqrt(4 - x ** 2))
            else:
                upper = (sigma * (1 + np.sqrt(inverse_aspect))) ** 2
                lower = (sigma * (1 - np.sqrt(inverse_aspect))) ** 2
                if upper < peak or upper > right or lower > peak:
                    return float(x.size) * _BAD_EDGE_PENALTY ** 2
                model = np.nan_to_num(1 / (2 * np.pi * sigma * sigma * x * inverse_aspect)
                                      * np.sqrt((upper - x) * (x - lower)))
        return float(np.sum((model - y) ** 2))

    return residual


def fit_marchenko_pastur_weightwatcher(eigenvalues: torch.Tensor, *, rows: int,
                                       cols: int) -> MarchenkoPasturFit:
    """weightwatcher 0.7.7's ``analyze(mp_fit=True)`` bulk fit, for parity.

    The ESD is rescaled by ``W_scale² = n / Σλ``; ``s`` is brute-forced on
    ``[0.05 s₀, 2 s₀)`` in steps of ``0.01 s₀`` (``s₀ = sqrt(λ_max) / (1 + 1/√Q)``)
    against a linear-kernel KDE (bandwidth 0.1, 1000 points on ``[0, λ_max + 0.5]``,
    points of density ≤ 0.01 ignored, bulk edges that miss the KDE's peak or range
    penalized; at ``Q = 1`` the quarter-circle law on the singular values), then polished
    with Nelder–Mead (``scipy.optimize.fmin``, as ``scipy.optimize.brute`` does by default).
    ``λ₊ = (s (1 + 1/√Q))²``; spikes are eigenvalues above ``λ₊ + √TW``, and
    ``mp_softrank = λ₊ / λ_max`` is not clipped to 1 (weightwatcher does not clip it).
    At ``Q = 1`` weightwatcher's quarter circle ``√(4 − x²) / (π s²)`` keeps its support at
    ``[0, 2]`` whatever ``s``, which only sets its height; we keep that for parity, but it is
    why this fit misses spikes of square matrices (docs/diagnose.md).
    Needs SciPy for the polish step. About 10–20 ms a matrix (weightwatcher: ~0.7 s).
    """
    try:
        from scipy.optimize import fmin
    except ImportError as error:  # pragma: no cover - scipy ships with the dev/bench extras
        raise SpectrakitError("mp_fit='weightwatcher' needs SciPy (pip install scipy)") from error
    evals = eigenvalues.detach().to(torch.float64).flatten().cpu().numpy()
    big, small = max(rows, cols), min(rows, cols)
    aspect = big / small
    w_scale = np.sqrt(evals.shape[0]) / np.sqrt(np.sum(evals))
    scale = w_scale * w_scale
    unit = scale * evals
    lambda_max = float(np.max(unit))
    s0 = np.sqrt(lambda_max / np.square(1.0 + 1.0 / np.sqrt(aspect)))
    residual = _mp_residual_factory(np.sqrt(unit) if aspect == 1 else unit, aspect)
    grid = np.mgrid[slice(0.05 * s0, 2.0 * s0, 0.01 * s0)]
    values = np.array([residual(sigma) for sigma in grid])
    start = grid[int(np.argmin(values))]
    sigma = float(np.asarray(fmin(residual, start, full_output=1, disp=False)[0]).ravel()[0])
    bulk_max = (sigma * (1 + 1 / np.sqrt(aspect))) ** 2
    tracy_widom = 1 / np.sqrt(aspect) * np.power(bulk_max, 2 / 3) * np.power(small, -2 / 3)
    num_spikes = int(np.count_nonzero(unit > bulk_max + np.sqrt(tracy_widom)))
    return MarchenkoPasturFit(num_spikes=num_spikes, mp_softrank=float(bulk_max / lambda_max),
                              bulk_max=float(bulk_max / scale), sigma_mp=sigma)


DEFAULT_MP_FIT = "quantile"
MP_FITS: dict[str, Callable[..., MarchenkoPasturFit]] = {
    "quantile": fit_marchenko_pastur,
    "iterative": fit_marchenko_pastur_iterative,
    "weightwatcher": fit_marchenko_pastur_weightwatcher,
}


def mp_fit_function(name: str) -> Callable[..., MarchenkoPasturFit]:
    """The bulk fit ``analyze(mp_fit=name)`` uses; a clear error for an unknown name.

    Args:
        name: one of ``MP_FITS`` (``"quantile"``, ``"iterative"``, ``"weightwatcher"``).
    """
    if name not in MP_FITS:
        raise SpectrakitError(f"mp_fit={name!r} is not one of {', '.join(MP_FITS)}")
    return MP_FITS[name]
