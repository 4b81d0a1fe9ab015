"""σ_min and condition numbers: within 1 % of the float64 SVD or marked unresolved, never 0 or inf,
and every metric the same whatever --threads or --workers is."""

from __future__ import annotations

import json
import math

import pytest
import torch

import spectrakit as sk
from spectrakit.cli import main
from spectrakit.linalg import resolution_floor, smallest_singular_value
from spectrakit.reference import reference_weights_path


def with_spectrum(m: int, n: int, ratio: float, seed: int = 0, flat: bool = False) -> torch.Tensor:
    """A float32 ``m × n`` matrix whose singular values run from 1 down to ``ratio``."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator))
    S = torch.ones(k, dtype=torch.float64) if flat else torch.logspace(0, math.log10(ratio), k, dtype=torch.float64)
    S[-1] = ratio
    return ((U * S) @ V.T).float()


def truth(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.double())


def rank_deficient(m: int = 200, n: int = 150) -> torch.Tensor:
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W[:, -1] = W[:, 0]  # a repeated column: exactly rank-deficient in float64 and after rounding to float32 alike
    return W


@pytest.mark.parametrize(("shape", "ratio", "flat"), [((300, 200), 1e-5, False), ((256, 256), 1e-5, True),
                                                      ((200, 300), 1e-3, False), ((256, 256), 1e-9, False),
                                                      ((700, 600), 1e-5, False)])  # > 512: inverse iteration
def test_smallest_singular_value_is_within_1_percent_of_float64_svd(shape, ratio, flat):
    W = with_spectrum(*shape, ratio, flat=flat)
    S = truth(W)
    # the float32 Gram spectrum cannot resolve this σ_min: that is why it is refined
    assert float(S[-1] / S[0]) < resolution_floor(shape, torch.float32, "gram")
    result = smallest_singular_value(W, sk.linalg.svdvals(W, method="gram"), method="gram")
    assert result.resolved and result.value == pytest.approx(float(S[-1]), rel=0.01)
    assert result.method == ("float64-svd" if ratio < 1e-7 else "float64-gram")


def test_a_resolved_spectrum_value_is_kept_and_a_rank_deficient_one_is_unresolved():
    W = torch.randn(300, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    S = torch.linalg.svdvals(W)
    assert smallest_singular_value(W, S, method="exact").method == "spectrum"
    singular = rank_deficient()
    result = smallest_singular_value(singular)
    assert result.value is None and result.method == "unresolved"
    assert float(truth(singular)[-1]) <= result.bound < 1e-9 * float(truth(singular)[0])


def _check_rows(table, matrices):
    for name, W in matrices.items():
        row, S = table[name], truth(W)
        assert row["status"] == "ok"
        if row["sigma_min_method"] == "unresolved":
            assert row["sigma_min"] is None and row["condition_number"] is None
            assert row["sigma_min_bound"] >= float(S[-1])
        else:
            assert row["sigma_min"] == pytest.approx(float(S[-1]), rel=0.01), name
            assert row["condition_number"] == pytest.approx(float(S[0] / S[-1]), rel=0.01), name


@pytest.mark.parametrize("options", [{}, {"method": "exact"}, {"method": "gram"}, {"dtype": torch.float64}])
def test_analyze_reports_accurate_or_unresolved_condition_numbers(options):
    matrices = {"gram_route.weight": with_spectrum(300, 200, 1e-5), "square.weight": with_spectrum(256, 256, 1e-5),
                "small.weight": with_spectrum(100, 80, 1e-5), "wide.weight": with_spectrum(150, 400, 1e-4),
                "singular.weight": rank_deficient().float(), "healthy.weight": with_spectrum(300, 200, 0.3)}
    table = sk.analyze(matrices, progress=False, farms=False, esd=False, **options)
    _check_rows(table, matrices)
    assert table["singular.weight"]["sigma_min_method"] == "unresolved"
    assert table["healthy.weight"]["sigma_min_method"] == "spectrum"  # no float64 work where none is needed


def test_bundled_model_condition_numbers_match_float64_svd(tmp_path):
    path = reference_weights_path()
    code = main(["analyze", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "spectra.json").read_text())["rows"]}
    matrices = {record.name: record.matrix() for record in sk.weights.iter_matrices(str(path))}
    _check_rows(rows, matrices)
    embed = rows["model.embed_tokens.weight"]
    assert embed["sigma_min_method"] != "unresolved" and math.isfinite(embed["condition_number"])
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "σ_min = 0" not in html and "σ_min unresolved" not in html


def _same(a, b) -> bool:
    """Equal values, NaN equal to NaN."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_no_metric_changes_with_threads_or_workers():
    path = str(reference_weights_path())

    def rows(**kwargs):
        return sk.analyze(path, progress=False, **kwargs).rows

    serial = rows(threads=1)
    for other in (rows(threads=2), rows(workers=2)):
        assert [row["name"] for row in other] == [row["name"] for row in serial]
        changed = [(row["name"], key) for row, twin in zip(serial, other) for key in row | twin
                   if not _same(row.get(key), twin.get(key))]
        assert changed == []
