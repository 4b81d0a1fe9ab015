"""sk.compare: intruder dimensions, ΔW metrics and principal angles against constructed truth."""

import math

import pytest
import torch

import spectrakit as sk
from spectrakit.errors import SpectrakitError


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64)).Q


def base_matrix(m=96, n=64, seed=0):
    U, V = orthonormal(m, n, seed), orthonormal(n, n, seed + 1)
    S = torch.linspace(10, 0.5, n, dtype=torch.float64)
    return (U * S) @ V.T, U, V


def test_large_rank_one_orthogonal_direction_is_exactly_one_intruder():
    W0, U, V = base_matrix()
    # a left direction orthogonal to the base's top singular vectors: an even mix of the bottom 32,
    # so its cosine with any single base vector is 1/√32 ≈ 0.18
    u = U[:, -32:].sum(dim=1) / math.sqrt(32)
    v = torch.randn(64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v /= v.norm()
    W1 = W0 + 25.0 * torch.outer(u, v)
    table = sk.compare({"layer.weight": W0}, {"layer.weight": W1}, k=10, epsilon=0.5, progress=False)
    row = table["layer.weight"]
    assert row["status"] == "ok"
    assert row["intruders"] == 1
    assert row["intruder_indices"] == "0"  # the new direction dominates the spectrum
    assert row["delta_fro_norm"] == pytest.approx(25.0, rel=1e-9)
    assert row["delta_spectral_norm"] == pytest.approx(25.0, rel=1e-9)
    assert row["delta_effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert table.summary()["total_intruders"] == 1


def test_small_noise_gives_no_intruders():
    W0, _, _ = base_matrix()
    noise = 1e-3 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = sk.compare({"w.weight": W0}, {"w.weight": W0 + noise}, progress=False)
    row = table["w.weight"]
    assert row["intruders"] == 0
    assert row["min_best_similarity"] > 0.9
    assert row["max_principal_angle_deg"] < 5


def test_principal_angles_known_subspaces():
    A = torch.eye(4, dtype=torch.float64)[:, :2]
    theta = 0.3
    B = torch.zeros(4, 2, dtype=torch.float64)
    B[0, 0] = 1.0
    B[1, 1], B[2, 1] = math.cos(theta), math.sin(theta)
    from spectrakit.analyze.compare import principal_angles

    angles = principal_angles(A, B)
    assert torch.allclose(angles.sort().values, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7)


def test_models_and_unmatched_layers(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    tuned = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 9))
    tuned[0].load_state_dict(base[0].state_dict())
    table = sk.compare(base, tuned, progress=False)
    assert table["0.weight"]["delta_fro_norm"] == 0.0
    assert table["0.weight"]["intruders"] == 0
    assert table["1.weight"]["status"] == "skipped" and "shape differs" in table["1.weight"]["reason"]


def test_bad_options():
    with pytest.raises(SpectrakitError, match="epsilon"):
        sk.compare({}, {}, epsilon=1.5)


def test_cli_compare(tmp_path, capsys):
    from safetensors.torch import save_file

    from spectrakit.cli import main

    W0, _, _ = base_matrix(32, 32)
    save_file({"a.weight": W0.float().contiguous()}, str(tmp_path / "base.safetensors"))
    save_file({"a.weight": (W0 + 0.01).float().contiguous()}, str(tmp_path / "tuned.safetensors"))
    code = main(["compare", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    assert "intruders" in capsys.readouterr().out
    assert (tmp_path / "out" / "compare.json").exists()
