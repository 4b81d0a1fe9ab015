"""Representation spectra: VNE, effective rank, nuclear norm and its L1,2 approximation."""

import math

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.features import feature_spectrum
from spectrakit.errors import SpectrakitError


def test_rank_one_features_have_zero_entropy():
    direction = torch.randn(16, dtype=torch.float64)
    Z = torch.randn(200, 1, dtype=torch.float64) * direction
    stats = feature_spectrum(Z)
    assert stats["vne"] == pytest.approx(0.0, abs=1e-6)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-6)


def test_isotropic_features_approach_full_entropy():
    Q = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64)).Q
    Z = torch.cat([Q, -Q])  # rows: ± an orthonormal basis → C = I/32 exactly
    stats = feature_spectrum(Z)
    assert stats["vne"] == pytest.approx(math.log(32), rel=1e-9)
    assert stats["rank_fraction"] == pytest.approx(1.0, rel=1e-9)


def test_nuclear_norm_exact_and_l12_on_orthogonal_columns():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(100, 20, generator=g, dtype=torch.float64)
    stats = feature_spectrum(Z)
    assert stats["nuclear_norm"] == pytest.approx(float(torch.linalg.svdvals(Z).sum()), rel=1e-12)
    # with orthogonal columns the singular values are the column norms: the approximation is exact
    Q = torch.linalg.qr(torch.randn(100, 20, generator=g, dtype=torch.float64)).Q
    scaled = Q * torch.linspace(1, 5, 20, dtype=torch.float64)
    stats = feature_spectrum(scaled)
    assert stats["nuclear_norm_l12"] == pytest.approx(stats["nuclear_norm"], rel=1e-9)
    assert stats["nuclear_time_s"] >= 0 and stats["nuclear_l12_time_s"] >= 0


def test_hooks_on_named_layers_and_sequence_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 12), torch.nn.Linear(12, 6))
    batches = [torch.randint(0, 50, (4, 10)) for _ in range(3)]
    table = sk.analyze_features(model, batches, layers=["0", "1"], progress=False, max_samples=100)
    assert [row["name"] for row in table] == ["0", "1"]
    assert table["1"]["samples"] == 100 and table["1"]["dim"] == 6
    with torch.no_grad():
        Z = torch.cat([model(b).reshape(-1, 6) for b in batches])[:100].double()
    assert table["1"]["nuclear_norm"] == pytest.approx(float(torch.linalg.svdvals(Z).sum()), rel=1e-9)
    assert model.training  # mode restored


def test_unknown_layer_pattern():
    with pytest.raises(SpectrakitError, match="matches no module"):
        sk.analyze_features(torch.nn.Linear(3, 3), [torch.randn(2, 3)], layers=["nope*"], progress=False)
