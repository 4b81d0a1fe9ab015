"""ESD metrics: power-law fit, weightwatcher parity, Marchenko–Pastur spikes, FARMS."""

from __future__ import annotations

import logging
import math
import statistics
import warnings

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.farms import farms_eigenvalues
from spectrakit.analyze.marchenko_pastur import fit_marchenko_pastur
from spectrakit.analyze.powerlaw import fit_power_law


def _spiked(rows: int, cols: int, spikes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(rows)
    for strength in range(spikes):
        u = torch.randn(rows, generator=generator, dtype=torch.float64)
        v = torch.randn(cols, generator=generator, dtype=torch.float64)
        noise += (4.0 + strength) * torch.outer(u / u.norm(), v / v.norm())
    return noise


# ----- the power-law fit -------------------------------------------------------------------
def test_pareto_exponent_is_recovered() -> None:
    generator = torch.Generator().manual_seed(1)
    for alpha in (2.0, 3.0, 4.5):
        sample = (1 - torch.rand(20000, generator=generator, dtype=torch.float64)) ** (-1 / (alpha - 1))
        fit = fit_power_law(sample)
        assert abs(fit.alpha - alpha) < 0.1 * alpha
        assert fit.xmin >= 1.0 and fit.tail_size > 100


@pytest.mark.parametrize("shape", [(300, 300), (900, 300), (40, 15), (30, 12)])
def test_fit_matches_weightwatchers_wwfit(shape: tuple[int, int]) -> None:
    """Same x_min, alpha and KS distance as weightwatcher 0.7.7 (large- and small-N paths)."""
    powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    evals = torch.linalg.svdvals(_spiked(*shape, spikes=3)) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = powerlaw.WWFit(evals[evals > 1e-5].numpy())
    ours = fit_power_law(evals)
    assert ours.alpha == pytest.approx(reference.alpha, rel=1e-10)
    assert ours.xmin == pytest.approx(reference.xmin, rel=1e-12)
    assert ours.ks_distance == pytest.approx(reference.D, rel=1e-8)


def test_median_and_fixed_xmin_are_the_tail_mle() -> None:
    evals = (torch.linalg.svdvals(_spiked(200, 100, spikes=2)) ** 2).sort().values
    tail = evals[evals.numel() // 2:]
    expected = 1 + tail.numel() / float((tail / tail[0]).log().sum())
    assert fit_power_law(evals, xmin="median").alpha == pytest.approx(expected, rel=1e-12)
    fixed = fit_power_law(evals, xmin=float(tail[0]))
    assert fixed.alpha == pytest.approx(expected, rel=1e-12) and fixed.tail_size == tail.numel()
    with pytest.raises(sk.SpectrakitError, match="xmin='peak'"):
        fit_power_law(evals, xmin="peak")


def test_degenerate_spectra_give_nan_not_errors() -> None:
    assert math.isnan(fit_power_law(torch.ones(50)).alpha)
    assert math.isnan(fit_power_law(torch.tensor([3.0])).alpha)


# ----- Marchenko–Pastur ----------------------------------------------------------------------
@pytest.mark.parametrize("spikes", [0, 1, 4])
def test_spikes_above_the_bulk_are_counted(spikes: int) -> None:
    W = _spiked(1200, 400, spikes, seed=spikes)
    fit = fit_marchenko_pastur(torch.linalg.svdvals(W) ** 2, rows=1200, cols=400)
    assert fit.num_spikes == spikes
    # entries of variance 1/N: WᵀW has bulk mean 1 and upper edge (1 + 1/√Q)², Q = 3
    assert fit.bulk_max == pytest.approx((1 + 1 / math.sqrt(3)) ** 2, rel=0.05)
    if spikes == 0:
        assert fit.mp_softrank > 0.9
    else:
        assert fit.mp_softrank < 0.5


# ----- FARMS -----------------------------------------------------------------------------------
def test_farms_windows_cover_the_matrix() -> None:
    W = torch.arange(64 * 300, dtype=torch.float64).reshape(64, 300).sin()
    evals = farms_eigenvalues(W)
    assert evals.numel() == 5 * 64  # windows at 0, 64, 128, 192 and one aligned to the end (236)
    last = torch.linalg.svdvals(W[:, 236:]) ** 2
    assert torch.allclose(evals[-64:].sort().values, last.sort().values, rtol=1e-9)
    assert farms_eigenvalues(W, max_blocks=2).numel() == 2 * 64


def test_farms_removes_the_aspect_ratio_bias_of_gaussian_matrices() -> None:
    """Gaussian matrices at aspect ratios 1, 1/4, 1/16: plain alpha drifts with the shape,
    FARMS alpha does not (same estimator on both, x_min at the median)."""
    plain, farms = [], []
    for seed, rows in enumerate((1024, 256, 64)):
        W = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(seed))
        table = sk.analyze({"layer.weight": W}, xmin="median", progress=False)
        row = table.rows[0]
        plain.append(row["alpha"])
        farms.append(row["farms_alpha"])
    plain_spread = max(plain) - min(plain)
    farms_spread = max(farms) - min(farms)
    assert plain_spread > 2.0, plain
    assert farms_spread < 0.1 * plain_spread, (plain, farms)


# ----- analyze(): columns, bad tensors, conv, exports ------------------------------------------------
def test_analyze_rows_have_the_esd_columns_and_bad_tensors_keep_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    state = {
        "good.weight": torch.randn(96, 64, generator=generator),
        "nan.weight": torch.full((32, 32), float("nan")),
        "zero.weight": torch.zeros(32, 16),
        "int8.weight": torch.ones(16, 16, dtype=torch.int8),
        "row.weight": torch.randn(1, 64, generator=generator),
        "also_good.weight": torch.randn(40, 120, generator=generator),
    }
    table = sk.analyze(state, progress=False)
    assert len(table) == len(state)
    by_name = {row["name"]: row for row in table}
    for name in ("good.weight", "also_good.weight"):
        row = by_name[name]
        assert row["status"] == "ok"
        S = torch.linalg.svdvals(state[name].double())
        assert row["spectral_norm"] == pytest.approx(float(S[0] ** 2), rel=1e-5)
        assert row["log_norm"] == pytest.approx(math.log10(float((S ** 2).sum())), rel=1e-5)
        assert row["alpha_weighted"] == pytest.approx(row["alpha"] * math.log10(float(S[0] ** 2)), rel=1e-6)
        assert row["alpha"] > 1 and row["farms_alpha"] > 1 and row["num_spikes"] >= 0
    for name in ("nan.weight", "zero.weight", "int8.weight", "row.weight"):
        assert by_name[name]["status"] == "skipped" and by_name[name]["reason"]
    summary = table.summary()
    assert summary["mean_alpha"] == pytest.approx(
        statistics.mean(by_name[n]["alpha"] for n in ("good.weight", "also_good.weight")))
    assert set(table.farms_spectra) == {"good.weight", "also_good.weight"}


def test_conv_layers_can_use_the_exact_operator_spectrum() -> None:
    conv = torch.nn.Conv2d(4, 6, 3, bias=False)
    exact = sk.analyze(conv, conv_input_shape=(8, 8), progress=False).rows[0]
    reshaped = sk.analyze(conv, progress=False).rows[0]
    operator = sk.linalg.conv_singular_values(conv.weight.detach().double(), (8, 8))
    assert exact["sigma_max"] == pytest.approx(float(operator.max()), rel=1e-5)
    assert exact["spectral_norm"] == pytest.approx(float(operator.max() ** 2), rel=1e-5)
    assert reshaped["sigma_max"] != pytest.approx(exact["sigma_max"], rel=1e-3)
    workers = sk.analyze(conv, conv_input_shape=(8, 8), progress=False, workers=2).rows[0]
    assert workers["sigma_max"] == pytest.approx(exact["sigma_max"], rel=1e-9)


def test_parquet_round_trip(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    table = sk.analyze(torch.nn.Linear(48, 32), progress=False)
    table.to_parquet(tmp_path / "spectra.parquet")
    frame = pd.read_parquet(tmp_path / "spectra.parquet")
    assert list(frame["name"]) == [row["name"] for row in table]
    assert frame["alpha"].iloc[0] == pytest.approx(table.rows[0]["alpha"])


# ----- parity with weightwatcher analyze() --------------------------------------------------------
def _weightwatcher_rows(model: torch.nn.Module) -> dict[str, dict]:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=model).analyze()
    return {row["longname"]: row for row in frame.to_dict("records")}


def _assert_parity(model: torch.nn.Module) -> None:
    reference = _weightwatcher_rows(model)
    table = sk.analyze(model, farms=False, progress=False)
    alpha_gaps = []
    for row in table.analyzed:
        theirs = reference.get(row["name"].removesuffix(".weight"))
        if theirs is None:
            continue
        assert row["spectral_norm"] == pytest.approx(theirs["spectral_norm"], rel=1e-3), row["name"]
        assert row["stable_rank"] == pytest.approx(theirs["stable_rank"], rel=1e-3), row["name"]
        alpha_gaps.append(abs(row["alpha"] - theirs["alpha"]))
    assert len(alpha_gaps) >= 0.9 * len(reference)
    assert statistics.median(alpha_gaps) <= 0.05


def test_parity_with_weightwatcher_on_the_reference_model() -> None:
    try:
        model = sk.reference_model()
    except sk.SpectrakitError as error:
        pytest.skip(str(error))
    _assert_parity(model)


def test_parity_with_weightwatcher_on_a_gpt2_shaped_model() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=192, n_layer=2, n_head=4, vocab_size=512, n_positions=256)
    _assert_parity(transformers.GPT2LMHeadModel(config).eval())


# ----- weightwatcher-compatible Marchenko–Pastur fit (mp_fit="weightwatcher") ---------------------------
def _assert_mp_parity(model: torch.nn.Module, layers: list[int] | None = None) -> None:
    """num_spikes equal and mp_softrank within 1e-4 of weightwatcher's analyze(mp_fit=True).

    Measured: all layers equal, mp_softrank within 2.5e-6 (the reference lm_head, where the
    Nelder–Mead polish starts from float32-rounded eigenvalues), elsewhere ~1e-15."""
    ww = pytest.importorskip("weightwatcher")
    pytest.importorskip("scipy")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=model).analyze(mp_fit=True, layers=layers or [])
    reference = {row["longname"]: row for row in frame.to_dict("records")}
    table = sk.analyze(model, farms=False, progress=False, mp_fit="weightwatcher")
    compared = spikes_equal = 0
    for row in table.analyzed:
        theirs = reference.get(row["name"].removesuffix(".weight"))
        if theirs is None:
            continue
        compared += 1
        spikes_equal += row["num_spikes"] == theirs["num_spikes"]
        assert row["mp_softrank"] == pytest.approx(theirs["mp_softrank"], abs=1e-4), row["name"]
        assert row["mp_bulk_max"] == pytest.approx(theirs["bulk_max"], rel=1e-3), row["name"]
    assert compared >= 0.8 * len(reference) and compared >= 5
    assert spikes_equal >= 0.9 * compared


def test_weightwatcher_mp_fit_parity_on_the_reference_model() -> None:
    try:
        model = sk.reference_model()
    except sk.SpectrakitError as error:
        pytest.skip(str(error))
    # weightwatcher's fit takes ~0.7 s a layer: embedding, Q = 1, Q = 2, two Q = 2.7 and lm_head
    ww = pytest.importorskip("weightwatcher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = list(ww.WeightWatcher(model=model).describe()["layer_id"])
    _assert_mp_parity(model, layers=[ids[i] for i in (0, 1, 2, 5, 7, len(ids) - 1)])


def test_weightwatcher_mp_fit_parity_on_a_gpt2_shaped_model() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=256, n_positions=128)
    _assert_mp_parity(transformers.GPT2LMHeadModel(config).eval())


def test_weightwatcher_mp_fit_counts_planted_spikes_and_passes_through_workers() -> None:
    pytest.importorskip("scipy")
    state = {f"s{spikes}.weight": _spiked(600, 200, spikes, seed=spikes).float() for spikes in (0, 3)}
    table = sk.analyze(state, farms=False, progress=False, mp_fit="weightwatcher")
    assert [row["num_spikes"] for row in table] == [0, 3]
    workers = sk.analyze(state, farms=False, progress=False, mp_fit="weightwatcher", workers=2)
    assert [row["mp_softrank"] for row in workers] == pytest.approx([row["mp_softrank"] for row in table], rel=1e-9)
    iterative = sk.analyze(state, farms=False, progress=False)
    assert [row["num_spikes"] for row in iterative] == [0, 3]
    with pytest.raises(sk.SpectrakitError, match="mp_fit"):
        sk.analyze(state, progress=False, mp_fit="kde")


def test_linear_kde_matches_scikit_learn() -> None:
    neighbors = pytest.importorskip("sklearn.neighbors")
    import numpy as np

    from spectrakit.analyze.marchenko_pastur import _linear_kde

    samples = np.random.default_rng(0).gamma(2.0, size=300)
    grid = np.linspace(0, samples.max() + 0.5, 1000)
    theirs = np.exp(neighbors.KernelDensity(kernel="linear", bandwidth=0.1)
                    .fit(samples[:, None]).score_samples(grid[:, None]))
    assert np.allclose(_linear_kde(samples, grid, 0.1), theirs, rtol=1e-10, atol=1e-300)
