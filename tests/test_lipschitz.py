"""Per-layer Lipschitz constants: power ≤ exact ≤ Gram bound, conv via the exact FFT spectrum."""

import math

import pytest
import torch

import spectrakit as sk


def conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))


def test_orderings_and_exact_conv_norm():
    net = conv_net()
    table = sk.lipschitz(net, example_input=torch.randn(2, 3, 8, 8), progress=False)
    assert [row["kind"] for row in table] == ["conv2d", "conv2d", "linear"]
    for row in table:
        assert row["power"] <= row["exact"] * (1 + 1e-9)
        assert row["gram"] >= row["exact"]
        assert row["gram"] <= 1.01 * row["exact"]
    truth = float(sk.linalg.conv_singular_values(net[0].weight.detach().double(), (8, 8))[0])
    assert table.rows[0]["exact"] == pytest.approx(truth, rel=1e-12)
    assert table.rows[2]["exact"] == pytest.approx(float(torch.linalg.matrix_norm(net[5].weight.detach().double(), 2)))
    assert table.rows[0]["reshaped"] != pytest.approx(truth, rel=1e-3)  # the reshaped kernel is not the operator norm


def test_product_bound_bounds_the_network():
    net = conv_net().double()
    table = sk.lipschitz(net, input_shapes={"0": (8, 8), "2": (8, 8)}, progress=False)
    bound = table.summary()["product_exact"]
    assert bound == pytest.approx(math.prod(row["exact"] for row in table))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    y = x + 1e-2 * torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ratios = (net(x) - net(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= bound


def test_conv_without_input_size_is_skipped_with_reason():
    table = sk.lipschitz(conv_net(), progress=False)
    assert table.rows[0]["status"] == "skipped" and "input size" in table.rows[0]["reason"]
    assert table.rows[2]["status"] == "ok"
    assert table.summary()["product_exact"] == math.inf
