"""analyze(conv="slices"): weightwatcher's per-tap pooled conv ESD, against weightwatcher 0.7.7 and float64."""

from __future__ import annotations

import logging
import statistics
import warnings

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.conv_slices import WEIGHTWATCHER_MAX_EVALS, weightwatcher_skips
from spectrakit.cli import main
from spectrakit.errors import SpectrakitError


def _vgg_like() -> torch.nn.Module:
    """A small image CNN: 3x3 and 5x5 convs, a 1x1 conv, a conv weightwatcher skips, a linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 48, 5), torch.nn.ReLU(),
        torch.nn.Conv2d(48, 448, 1), torch.nn.ReLU(),
        # 36 taps of 64 x 448: 2 304 eigenvalues, which weightwatcher counts as 36 · 448 = 16 128,
        # over its max_evals (15 000), and skips
        torch.nn.Conv2d(448, 64, 6), torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval()


def _digits_cnn() -> torch.nn.Module:
    """A CNN trained for a few steps on the scikit-learn digits (8x8 images), CREPE-style (k x 1) kernels too."""
    X, y = sk.data.digits("train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.ReLU(),  # per-tap slices 24x1: we skip, ww does not
        torch.nn.Conv2d(24, 32, (3, 1), padding=(1, 0)), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 40, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(160, 10))
    images = X.reshape(-1, 1, 8, 8).float() / 16
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        batch = slice(64 * step % len(images), 64 * step % len(images) + 64)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _weightwatcher_rows(model: torch.nn.Module, **options) -> dict[str, dict]:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=model).analyze(**options)
    return {row["longname"]: row for row in frame.to_dict("records")}


@pytest.mark.parametrize("build", [_vgg_like, _digits_cnn])
def test_slices_match_weightwatcher_on_every_conv_layer_it_analyzes(build) -> None:
    model = build()
    reference = _weightwatcher_rows(model)
    table = sk.analyze(model, conv="slices", farms=False, progress=False)
    alpha_gaps, compared, skipped_by_ww = [], 0, 0
    for row in table:
        theirs = reference.get(row["name"].removesuffix(".weight"))
        if row["kind"] != "conv2d":
            continue
        assert row["conv"] == "slices"
        shape = tuple(int(size) for size in row["shape"].split("x"))
        assert (theirs is None) == weightwatcher_skips(shape), row["name"]
        if theirs is None:  # weightwatcher skipped it (its eigenvalue count): we analyze it
            assert row["status"] == "ok" and row["num_evals"] == 36 * 64 <= WEIGHTWATCHER_MAX_EVALS
            skipped_by_ww += 1
            continue
        if row["status"] != "ok":  # only 1xn slices, which weightwatcher pools anyway
            assert "per-tap slices are 24x1" in row["reason"]
            continue
        compared += 1
        assert row["num_evals"] == theirs["num_evals"], row["name"]
        assert row["spectral_norm"] == pytest.approx(theirs["spectral_norm"], rel=1e-3), row["name"]
        assert row["stable_rank"] == pytest.approx(theirs["stable_rank"], rel=1e-3), row["name"]
        alpha_gaps.append(abs(row["alpha"] - theirs["alpha"]))
    assert compared >= 2 and skipped_by_ww == (build is _vgg_like)
    assert statistics.median(alpha_gaps) <= 0.05


def test_weightwatcher_mp_fit_follows_the_slices() -> None:
    """num_spikes and mp_softrank of the pooled ESD, with one slice's aspect ratio, as weightwatcher's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 40, 3), torch.nn.Conv2d(40, 24, 3))
    reference = _weightwatcher_rows(model, mp_fit=True)
    table = sk.analyze(model, conv="slices", farms=False, progress=False, mp_fit="weightwatcher")
    for row in table:
        theirs = reference[row["name"].removesuffix(".weight")]
        assert row["num_spikes"] == theirs["num_spikes"]
        assert row["mp_softrank"] == pytest.approx(theirs["mp_softrank"], rel=1e-3)


def test_pooled_spectrum_is_every_tap_slice_in_float64() -> None:
    torch.manual_seed(0)
    conv2d, conv1d = torch.nn.Conv2d(6, 10, (3, 2)), torch.nn.Conv1d(7, 5, 4)
    for layer, scale in [(conv2d, 0.5), (conv1d, 1.0)]:  # weightwatcher's conv2d_norm is for Conv2d only
        kernel = layer.weight.detach().double()
        taps = kernel.reshape(*kernel.shape[:2], -1)
        truth = torch.cat([torch.linalg.svdvals(taps[:, :, t]) for t in range(taps.shape[-1])]) ** 2 * scale
        table = sk.analyze(layer, conv="slices", progress=False, dtype=torch.float64)
        row = table.rows[0]
        assert row["num_evals"] == truth.numel()
        assert row["spectral_norm"] == pytest.approx(float(truth.max()), rel=1e-9)
        assert row["stable_rank"] == pytest.approx(float(truth.sum() / truth.max()), rel=1e-9)
        assert torch.allclose(table.spectra["weight"].square(), truth.sort(descending=True).values)
    unscaled = sk.analyze(conv2d, conv="slices", conv2d_norm=False, progress=False, dtype=torch.float64).rows[0]
    scaled = sk.analyze(conv2d, conv="slices", progress=False, dtype=torch.float64).rows[0]
    assert unscaled["spectral_norm"] == pytest.approx(2 * scaled["spectral_norm"], rel=1e-12)
    assert unscaled["stable_rank"] == pytest.approx(scaled["stable_rank"], rel=1e-12)
    assert unscaled["alpha"] == pytest.approx(scaled["alpha"], rel=1e-9)


def test_farms_follows_the_slices() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, (3, 1))  # taps of 16x8: two 8x8 windows each, six in all
    table = sk.analyze(conv, conv="slices", progress=False, dtype=torch.float64)
    kernel = conv.weight.detach().double()
    truth = torch.cat([torch.linalg.svdvals(kernel[r:r + 8, :, t, 0] * 0.5 ** 0.5) ** 2
                       for t in range(3) for r in (0, 8)])
    assert torch.allclose(table.farms_spectra["weight"].sort().values, truth.sort().values)
    reshaped = sk.analyze(conv, progress=False, dtype=torch.float64)  # 16x24: two 16x16 windows
    assert reshaped.farms_spectra["weight"].numel() == 2 * 16 and reshaped.rows[0]["conv"] == "reshape"


def test_rows_state_their_conv_treatment_and_threads_agree() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv1d(8, 8, 3), torch.nn.Linear(8, 8))
    serial = sk.analyze(model, conv="slices", progress=False, threads=1)
    assert [row.get("conv") for row in serial] == ["slices", "slices", None]
    threaded = sk.analyze(model, conv="slices", progress=False, threads=2)
    assert [row["alpha"] for row in threaded] == pytest.approx([row["alpha"] for row in serial], nan_ok=True)
    operator = sk.analyze(model, conv_input_shape=(8,), include="1.", progress=False)
    assert operator.rows[0]["conv"] == "operator"
    assert "slices" in serial.format().splitlines()[2]


def test_degenerate_slices_are_skipped_with_their_reason() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8))
    table = sk.analyze(model, conv="slices", progress=False)
    for row, shape in zip(table, ["8x1", "8x1"]):
        assert row["status"] == "skipped"
        assert row["reason"].startswith(f"per-tap slices are {shape}: one singular value each")
    assert all(row["status"] == "ok" for row in sk.analyze(model, progress=False))


def test_bad_conv_options_get_one_clear_line(tmp_path, capsys) -> None:
    conv = torch.nn.Conv2d(4, 8, 3)
    with pytest.raises(SpectrakitError, match=r"conv='pooled' is not one of reshape, slices"):
        sk.analyze(conv, conv="pooled", progress=False)
    with pytest.raises(SpectrakitError, match="pass one"):
        sk.analyze(conv, conv="slices", conv_input_shape=(8, 8), progress=False)
    try:
        status = main(["analyze", "x.safetensors", "--conv", "pooled"])
    except SystemExit as exit_info:  # argparse's own exit
        status = exit_info.code
    assert status == 2
    assert "argument --conv: invalid choice: 'pooled'" in capsys.readouterr().err


def test_cli_conv_slices_writes_the_treatment(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "cnn.safetensors"
    save_file({"conv.weight": torch.randn(16, 8, 3, 3), "head.weight": torch.randn(10, 16)}, str(path))
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--conv", "slices", "--out", str(out), "--quiet", "--no-html"]) == 0
    header, conv_row, head_row = (out / "spectra.csv").read_text().splitlines()
    columns = header.split(",")
    assert dict(zip(columns, conv_row.split(",")))["conv"] == "slices"
    assert dict(zip(columns, conv_row.split(",")))["num_evals"] == "72"
    assert dict(zip(columns, head_row.split(",")))["conv"] == ""
    assert main(["analyze", str(path), "--conv", "slices", "--conv-input", "8x8", "--out", str(out), "--quiet"]) == 2
