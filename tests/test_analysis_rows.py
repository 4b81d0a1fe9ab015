"""Feature-learning spectral condition, Matrix Nuclear-Norm and Spectral DeTuning on known answers."""

import math

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze.detuning import detune, spectral_detuning
from spectrakit.analyze.feature_learning import spectral_condition
from spectrakit.analyze.nuclear_norm import matrix_nuclear_norm, response_nuclear_norm
from spectrakit.errors import SpectrakitError


def orthonormal_rows(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=torch.float64)).Q.T


def test_spectral_condition_verdicts_on_planted_norms():
    model = torch.nn.Sequential(torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(16, 64, bias=False)).double()
    base = {"0.weight": orthonormal_rows(16, 64, 0) * 0.5,          # σ₁ = √(16/64): on target
            "1.weight": orthonormal_rows(16, 64, 1).T * 2.0}        # σ₁ = √(64/16): on target
    tuned = {"0.weight": base["0.weight"] * 1.25,                   # ΔW = W/4, σ₁(ΔW) = target/4
             "1.weight": base["1.weight"] + 20 * orthonormal_rows(16, 64, 2).T}   # ΔW 10× the target
    model.load_state_dict(tuned)
    table = spectral_condition(model, base, progress=False)
    first, second = table["0.weight"], table["1.weight"]
    assert first["target"] == pytest.approx(0.5) and second["target"] == pytest.approx(2.0)
    assert first["sigma_ratio"] == pytest.approx(1.25) and first["delta_ratio"] == pytest.approx(0.25)
    assert first["verdict"] == "ok"
    assert second["delta_ratio"] == pytest.approx(10.0) and second["verdict"] == "too large"
    assert spectral_condition(base, progress=False)["1.weight"]["verdict"] == "ok"
    assert spectral_condition({"w": base["0.weight"] * 0.01}, progress=False)["w"]["verdict"] == "too small"


def test_matrix_nuclear_norm_known_answers():
    distinct = torch.eye(5, 12, dtype=torch.float64)
    assert response_nuclear_norm(distinct) == {"mnn": 1.0, "mnn_l12": 1.0, "rows": 5}
    p = torch.softmax(torch.randn(12, dtype=torch.float64), 0)
    same = p.expand(9, 12)
    result = response_nuclear_norm(same)
    assert result["mnn"] == pytest.approx(float(p.norm()) / 3, rel=1e-10)      # ‖p‖ √N / N
    # the L1,2 approximation sums the largest column norms: √N Σ_j p_j over the top min(N, V) = 9 columns
    assert result["mnn_l12"] == pytest.approx(float(p.sort(descending=True).values[:9].sum()) / 3, rel=1e-10)
    # a model whose logits are a planted matrix: the exact value follows from the SVD of its softmax
    logits = torch.randn(2, 7, 6, dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return logits

    got = matrix_nuclear_norm(Fixed(), [torch.zeros(2, 7)])
    A = logits[:, :-1].softmax(-1).reshape(-1, 6)
    assert got["mnn"] == pytest.approx(float(torch.linalg.svdvals(A).sum()) / 12, rel=1e-10)
    assert math.isfinite(got["mnn_l12"]) and got["mnn_l12"] > 0


def test_spectral_detuning_recovers_a_planted_base():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(48, 32, generator=g, dtype=torch.float64),
            "b.weight": torch.randn(32, 24, generator=g, dtype=torch.float64)}

    def lora_finetune():
        return {name: W + torch.randn(W.shape[0], 4, generator=g, dtype=torch.float64)
                @ torch.randn(4, W.shape[1], generator=g, dtype=torch.float64) * 0.5 for name, W in base.items()}

    tuned = [lora_finetune() for _ in range(8)]
    recovered = spectral_detuning(tuned, rank=4, progress=False)
    naive = {name: torch.stack([t[name] for t in tuned]).mean(0) for name in base}
    for name, W in base.items():
        error = float((recovered[name] - W).norm() / W.norm())
        assert error < 1e-6
        assert float((naive[name] - W).norm() / W.norm()) > 0.1   # averaging alone does not recover it
    table = sk.compare(base, recovered, progress=False)
    assert all(row["delta_fro_relative"] < 1e-6 and row["intruders"] == 0 for row in table)
    with pytest.raises(SpectrakitError, match="at least 2"):
        detune([base["a.weight"]], rank=4)
    with pytest.raises(SpectrakitError, match="rank="):
        detune([base["a.weight"]] * 3, rank=0)
