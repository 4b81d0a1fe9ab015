"""The bounded x_min search gives the x_min, alpha and KS distance of the full search.

Ground truth is a plain float64 loop over every candidate x_min (the definition, written out
once more here), on real ESDs (the reference model's trained weights, one layer and pooled
like conv taps) and on synthetic ones chosen to stress the pruning: flat KS distances
(noise), ties, small N, the sizes around the switch to the bounding levels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import spectrakit as sk
from spectrakit.analyze import ks_search
from spectrakit.analyze.powerlaw import EVALS_THRESH, SMALL_N, fit_power_law


def _reference_search(eigenvalues: torch.Tensor) -> tuple[int, float, float, int]:
    """(x_min index, alpha, D, tail size) of the KS search, one candidate at a time in float64
    (index −1 when no candidate qualifies: fewer than 20 eigenvalues and no tail of 8)."""
    data = np.sort(eigenvalues.double().numpy())
    data = data[data > EVALS_THRESH]
    count = data.size
    small = count < SMALL_N
    logs = np.log(data)
    best = (-1, math.nan, math.inf, 0)
    for i in range(count - 1):
        n = count - i
        log_excess = logs[i:].sum() - n * logs[i]
        if log_excess <= 1e-12 or (small and n < 8):
            continue
        alpha = 1 + (n - 1 if small else n) / log_excess
        fitted = 1 - np.exp((1 - alpha) * (logs[i:] - logs[i]))
        distance = float(np.abs(np.arange(n) / n - fitted).max())
        if distance < best[2]:  # strict: the first of equal distances wins
            best = (i, alpha, distance, n)
    return best


def _assert_same_fit(eigenvalues: torch.Tensor) -> None:
    index, alpha, distance, tail = _reference_search(eigenvalues)
    data = np.sort(eigenvalues.double().numpy())
    data = data[data > EVALS_THRESH]
    fit = fit_power_law(eigenvalues)
    if index < 0:
        assert math.isnan(fit.alpha) and fit.tail_size == 0
        return
    assert fit.xmin == data[index] and fit.tail_size == tail
    assert fit.alpha == pytest.approx(alpha, rel=1e-11)
    assert fit.ks_distance == pytest.approx(distance, rel=1e-11, abs=1e-14)


def _reference_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from spectrakit.reference import reference_weights_path

    try:
        return load_file(str(reference_weights_path()))
    except sk.SpectrakitError as error:
        pytest.skip(str(error))


def _spectrum(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double()) ** 2


def test_real_esds_of_the_reference_model() -> None:
    weights = _reference_weights()
    matrices = [w for w in weights.values() if w.ndim == 2 and min(w.shape) >= 64]
    assert len(matrices) >= 10
    spectra = [_spectrum(matrix) for matrix in matrices]
    for spectrum in spectra[:4]:  # single layers: 128–256 eigenvalues (the direct pass)
        _assert_same_fit(spectrum)
    # pooled as weightwatcher pools conv taps: thousands of eigenvalues (the bounding levels)
    pooled = torch.cat(spectra[:14])
    assert pooled.numel() > 2500
    _assert_same_fit(pooled)


def _pooled_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` eigenvalues pooled from ``m × 2m`` Gaussian slices (conv taps of noise), m ≤ 100."""
    side = min(count, 100)
    slices = torch.randn(-(-count // side), side, 2 * side, generator=generator, dtype=torch.float64)
    return _spectrum(slices / math.sqrt(2 * side)).flatten()[:count]


@pytest.mark.parametrize("count", [5, 12, 19, 20, 300, 320, 321, 700, 2500])
@pytest.mark.parametrize("kind", ["noise", "pareto", "spiked", "ties"])
def test_synthetic_esds(kind: str, count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    if kind == "noise":  # Marchenko–Pastur: the KS distance is nearly flat in x_min
        eigenvalues = _pooled_noise(count, generator)
    elif kind == "pareto":
        eigenvalues = (1 - torch.rand(count, generator=generator, dtype=torch.float64)) ** (-1 / 2.0)
    elif kind == "spiked":  # a noise bulk and a few outliers far above it
        spikes = torch.tensor([3.0, 5.0, 8.0, 12.0], dtype=torch.float64)[: max(1, count // 100)]
        eigenvalues = torch.cat([_pooled_noise(count - spikes.numel(), generator), spikes])
    else:  # many equal eigenvalues, equal tops included (candidates with no log excess)
        eigenvalues = torch.randint(1, 12, (count,), generator=generator).double()
    _assert_same_fit(eigenvalues)


def test_every_candidate_is_bracketed_by_its_bounds() -> None:
    """L ≤ D ≤ U at every level, and tails the grid covers get their exact D."""
    generator = torch.Generator().manual_seed(3)
    data = _pooled_noise(900, generator).sort().values
    logs = data.log()
    count = logs.numel()
    tail = torch.arange(count, 1, -1, dtype=torch.float64)
    alphas = 1 + tail / (logs.flip(0).cumsum(0).flip(0)[:-1] - tail * logs[:-1])
    candidates = torch.arange(count - 1)
    exact = ks_search.tail_ks_distances(logs, alphas, candidates)
    for i in (0, 17, 450, count - 2):
        n = count - i
        direct = np.abs(np.expm1((1 - float(alphas[i])) * (logs[i:] - logs[i]).numpy()) + np.arange(n) / n).max()
        assert float(exact[i]) == pytest.approx(direct, rel=1e-12)
    for points in (16, 64, 256):
        lower, upper = ks_search._grid_bounds(logs, alphas, candidates, points)
        assert bool((lower <= exact + 1e-15).all()) and bool((exact <= upper + 1e-15).all())
        covered = tail <= points + 1
        assert torch.equal(lower[covered], exact[covered])
        assert bool((upper[~covered] > lower[~covered]).any())  # the bounds are bounds, not the values


def test_large_pooled_esd_matches_weightwatchers_wwfit() -> None:
    powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    generator = torch.Generator().manual_seed(5)
    taps = torch.randn(9, 200, 120, generator=generator, dtype=torch.float64) / math.sqrt(200)
    taps[:, :4, :4] += 3.0 * torch.eye(4, dtype=torch.float64)  # a few spikes per tap
    eigenvalues = torch.linalg.svdvals(taps).flatten() ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = powerlaw.WWFit(eigenvalues[eigenvalues > EVALS_THRESH].numpy())
    ours = fit_power_law(eigenvalues)
    assert eigenvalues.numel() == 1080
    assert ours.xmin == pytest.approx(reference.xmin, rel=1e-12)
    assert ours.alpha == pytest.approx(reference.alpha, rel=1e-10)
    assert ours.ks_distance == pytest.approx(reference.D, rel=1e-8)
