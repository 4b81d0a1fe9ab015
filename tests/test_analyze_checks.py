"""Nonsense requests get an error or a warning that says what happened, not a silent exit 0."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import spectrakit as sk
from spectrakit.analyze.powerlaw import fit_power_law
from spectrakit.cli import main
from spectrakit.errors import SpectrakitError, SpectrakitWarning


def layers(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(64, 32, generator=generator), "b.weight": torch.randn(48, 40, generator=generator)}


def test_xmin_above_the_spectrum_warns_and_leaves_alpha_unfitted():
    matrices = layers()
    largest = max(float(torch.linalg.svdvals(W.double())[0] ** 2) for W in matrices.values())
    with pytest.warns(SpectrakitWarning, match=r"fewer than two eigenvalues in the tail of 2 of the 2"):
        table = sk.analyze(matrices, xmin=10 * largest, progress=False, farms=False)
    assert all(math.isnan(row["alpha"]) for row in table)  # not a fit to two eigenvalues


def test_xmin_below_the_spectrum_warns_and_fits_the_whole_esd():
    W = layers()["a.weight"]
    evals = torch.linalg.svdvals(W.double()) ** 2
    with pytest.warns(SpectrakitWarning, match="below every eigenvalue of 1 of the 1"):
        table = sk.analyze({"a.weight": W}, xmin=float(evals.min()) / 10, progress=False, farms=False)
    assert table.rows[0]["alpha"] == pytest.approx(fit_power_law(evals, xmin=float(evals.min())).alpha, rel=1e-6)
    assert table.rows[0]["num_pl_spikes"] == evals.numel()


def test_xmin_inside_the_spectrum_is_silent(recwarn):
    W = layers()["a.weight"]
    median = float((torch.linalg.svdvals(W.double()) ** 2).median())
    sk.analyze({"a.weight": W}, xmin=median, progress=False, farms=False)
    assert not [w for w in recwarn if issubclass(w.category, SpectrakitWarning)]


def test_cli_prints_the_xmin_warning_as_one_line(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_file(layers(), str(path))
    assert main(["analyze", str(path), "--xmin", "1e9", "--out", str(tmp_path / "out"), "--quiet", "--no-farms"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spectrakit: warning: xmin=1e+09"), err


@pytest.mark.parametrize(("include", "exclude", "expected"), [
    (["attention"], None, r"include \['attention'\] matches none of the 2 matrices \(names such as a.weight"),
    (None, ["*.weight"], r"exclude \['\*.weight'\] leave none of the 2"),
])
def test_a_selection_that_matches_nothing_is_an_error(include, exclude, expected):
    with pytest.raises(SpectrakitError, match=expected):
        sk.analyze(layers(), include=include, exclude=exclude, progress=False)
    with pytest.raises(SpectrakitError, match=expected):
        sk.compare(layers(), layers(), include=include, exclude=exclude, progress=False)


def test_cli_include_matching_nothing_exits_2(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_file(layers(), str(path))
    assert main(["analyze", str(path), "--include", "attention", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches none of the 2 matrices" in err[0]


def test_compare_of_unrelated_models():
    # different architectures: nothing to pair
    with pytest.raises(SpectrakitError, match="none of the 2 matrices .* same-named, same-shaped"):
        sk.compare({"x.weight": torch.randn(8, 8)}, layers(), progress=False)
    # same architecture, independent weights: ‖ΔW‖/‖W₀‖ ≈ √2
    with pytest.warns(SpectrakitWarning, match="does not look like a fine-tune"):
        table = sk.compare(layers(0), layers(1), progress=False)
    assert all(row["delta_fro_relative"] > 1.2 for row in table)


def test_compare_of_a_fine_tune_is_silent_and_partial_matches_warn(recwarn):
    base = layers()
    tuned = {name: W + 0.01 * torch.randn_like(W) for name, W in base.items()}
    sk.compare(base, tuned, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, SpectrakitWarning)]
    with pytest.warns(SpectrakitWarning, match="1 of the 3 matrices .* no same-named"):
        sk.compare(base, {**tuned, "new.weight": torch.randn(4, 4)}, progress=False)


def conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4))


def test_conv_input_with_the_wrong_number_of_sizes_is_an_error(tmp_path, capsys):
    with pytest.raises(SpectrakitError, match=r"conv input 16 has 1 size, but the 2 conv layers .* need 2 sizes"):
        sk.analyze(conv_model(), conv_input_shape=(16,), progress=False)
    path = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in conv_model().state_dict().items()}, str(path))
    assert main(["analyze", str(path), "--conv-input", "16", "--out", str(tmp_path / "out")]) == 2
    assert "need 2 sizes" in capsys.readouterr().err


def test_conv_input_that_fits_some_or_no_layers_warns():
    mixed = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    with pytest.warns(SpectrakitWarning, match="fits 1 of the 2 conv layers; the other 1"):
        table = sk.analyze(mixed, conv_input_shape=(16,), progress=False, farms=False)
    assert table.rows[0]["status"] == "ok"
    operator = sk.linalg.conv_singular_values(mixed[0].weight.detach().double(), (16,))
    assert table.rows[0]["sigma_max"] == pytest.approx(float(operator.max()), rel=1e-5)
    with pytest.warns(SpectrakitWarning, match="has no effect: none of the 1 matrices is a conv layer"):
        sk.analyze(torch.nn.Linear(8, 8), conv_input_shape=(16, 16), progress=False)


def test_an_empty_matrix_is_skipped_as_empty():
    table = sk.analyze({"empty.weight": torch.zeros(0, 5), "row.weight": torch.randn(1, 5)}, progress=False)
    reasons = {row["name"]: row["reason"] for row in table}
    assert reasons["empty.weight"] == "empty 0x5 matrix: it has no singular values"
    assert "single singular value" in reasons["row.weight"]


class _Tripwire:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["torch-zip", "plain-pickle"])
def test_pickle_refusal_says_spectrakit_never_unpickles_and_how_to_convert(tmp_path, capsys, kind):
    import pickle

    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(2, 2), "trap": _Tripwire(str(marker))}
    if kind == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert main(["analyze", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never unpickles" in err[0] and "save_file(" in err[0] and "evil.safetensors" in err[0]
    assert "add_safe_globals" not in err[0] and "Re-running" not in err[0]
    assert not marker.exists()
