"""Parametrizations: spectral normalization (Linear, conv operator norm), weight norm, multipliers, removal."""

import pytest
import torch
from torch.nn.utils import parametrize

import spectrakit as sk
from spectrakit.errors import SpectrakitError
from spectrakit.regularize import learnable_multipliers, remove_parametrizations, spectral_normalize, weight_normalize

# Tiny matrices: a second intra-op thread only adds contention (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def sigma(W):
    return float(torch.linalg.matrix_norm(W.detach().double().flatten(1), 2))


@pytest.mark.parametrize("target", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("method", ["power", "exact"])
def test_spectral_normalize_linear(target, method):
    torch.manual_seed(0)
    layer = spectral_normalize(torch.nn.Linear(24, 40), target=target, method=method)
    assert sigma(layer.weight) == pytest.approx(target, rel=1e-5)
    # training moves the weight; the per-forward power step keeps tracking it
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        layer(torch.randn(16, 24)).square().mean().backward()
        optimizer.step()
    for _ in range(20):
        layer(torch.randn(2, 24))
    assert sigma(layer.weight) == pytest.approx(target, rel=1e-3)


@pytest.mark.parametrize("conv_cls, size", [(torch.nn.Conv2d, (9, 7)), (torch.nn.Conv1d, (11,))])
def test_exact_conv_gives_the_operator_norm(conv_cls, size):
    torch.manual_seed(0)
    conv = conv_cls(3, 6, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    spectral_normalize(conv, target=1.0, exact_conv=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    conv(x)  # the first forward shows the grid and re-warms the vectors
    conv.eval()
    operator = float(sk.linalg.conv_singular_values(conv.weight.detach(), size)[0])
    assert operator == pytest.approx(1.0, rel=1e-6)
    assert sigma(conv.weight) != pytest.approx(1.0, rel=1e-2)  # the reshaped kernel is not normalized
    # circular padding: the layer really is 1-Lipschitz, with equality reached
    gains = [float(conv(v).norm() / v.norm()) for v in torch.randn(20, 1, 3, *size, dtype=torch.float64)]
    assert max(gains) <= 1 + 1e-9


def test_exact_conv_with_given_input_shape_and_groups_and_dilation():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="circular", dtype=torch.float64)
    spectral_normalize(conv, target=2.0, exact_conv=True, method="exact", input_shape=(4, 10, 10))
    # ground truth: the dense (block-diagonal, dilated) kernel's operator spectrum
    W = conv.weight.detach()
    dense = torch.zeros(6, 4, 5, 5, dtype=torch.float64)
    dense[:3, :2, ::2, ::2] = W[:3]
    dense[3:, 2:, ::2, ::2] = W[3:]
    assert float(sk.linalg.conv_singular_values(dense, (10, 10))[0]) == pytest.approx(2.0, rel=1e-10)
    x = torch.randn(20, 4, 10, 10, dtype=torch.float64)
    assert float((conv(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()) <= 2 + 1e-9


def test_reshaped_conv_normalization_without_exact_conv():
    conv = spectral_normalize(torch.nn.Conv2d(3, 8, 3), target=1.0)
    assert sigma(conv.weight) == pytest.approx(1.0, rel=1e-5)


def test_transformers_conv1d_and_embedding():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 20, (2, 6))
    mlp = model.transformer.h[0].mlp
    spectral_normalize(mlp.c_fc, target=1.5)
    weight_normalize(mlp.c_proj)
    learnable_multipliers(model.transformer.h[0].attn.c_attn, "row")
    spectral_normalize(model.transformer.wpe, target=2.0)
    assert sigma(mlp.c_fc.weight) == pytest.approx(1.5, rel=1e-5)
    assert sigma(model.transformer.wpe.weight) == pytest.approx(2.0, rel=1e-5)
    # Conv1D stores (in, out): weight norm is per output neuron, i.e. per stored column
    assert mlp.c_proj.parametrizations.weight.original0.shape == (1, 8)
    assert model.transformer.h[0].attn.c_attn.parametrizations.weight[0].scale.shape == (1, 24)
    before = model(ids).logits
    for module in (mlp.c_fc, mlp.c_proj, model.transformer.h[0].attn.c_attn, model.transformer.wpe):
        remove_parametrizations(module)
        assert not parametrize.is_parametrized(module)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, groups=4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10), torch.nn.Tanh(), torch.nn.Linear(10, 5, bias=False))


@pytest.mark.parametrize("apply", [
    lambda m: spectral_normalize(m, target=0.8),
    lambda m: spectral_normalize(m, target=1.2, exact_conv=True),
    lambda m: spectral_normalize(m, method="exact", exact_conv=True),
    lambda m: weight_normalize(m),
    lambda m: learnable_multipliers(m, "scalar"),
    lambda m: learnable_multipliers(m, "row"),
    lambda m: learnable_multipliers(m, "column"),
    lambda m: learnable_multipliers(spectral_normalize(m), "row"),  # stacked
], ids=["spectral", "spectral-exact-conv", "spectral-svd", "weight-norm", "scalar", "row", "column", "stacked"])
def test_removal_keeps_outputs(apply):
    model = conv_net()
    x = torch.randn(4, 3, 6, 6)
    reference = model(x)
    layers = [m for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for layer in layers:
        apply(layer)
    if "Spectral" not in repr(model):  # weight norm and multipliers leave the model unchanged at first
        torch.testing.assert_close(model(x), reference)
    # train a few steps so every parametrization's own state (vectors, g, multipliers) moves
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    before = model(x)
    for layer in layers:
        remove_parametrizations(layer)
    assert not any(parametrize.is_parametrized(layer) for layer in layers)
    # bitwise for the power iteration; an SVD may round differently with and without autograd
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-7)
    # still trainable afterwards, as plain parameters
    assert all(isinstance(layer.weight, torch.nn.Parameter) for layer in layers)


def test_multipliers_start_exact_and_train():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5)
    reference = layer(x)
    learnable_multipliers(layer, "column")
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)
    scale = layer.parametrizations.weight[0].scale
    assert scale.shape == (1, 5) and scale in set(layer.parameters())
    layer(x).sum().backward()
    assert scale.grad is not None and float(scale.grad.abs().sum()) > 0


def test_weight_normalize_formula():
    torch.manual_seed(0)
    layer = weight_normalize(torch.nn.Conv2d(2, 3, 3))
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    with torch.no_grad():
        g.fill_(2.0)
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 2.0))
    assert g.shape == (3, 1, 1, 1) and v.shape == (3, 2, 3, 3)


def test_weight_normalize_matches_torch_and_keeps_zero_neurons():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()
    theirs.load_state_dict(ours.state_dict())
    weight_normalize(ours)
    torch.nn.utils.parametrizations.weight_norm(theirs)
    x = torch.randn(5, 6, dtype=torch.float64)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for a, b in zip((ours.parametrizations.weight.original0, ours.parametrizations.weight.original1),
                    (theirs.parametrizations.weight.original0, theirs.parametrizations.weight.original1)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    layer = torch.nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight[1] = 0.0  # a dead neuron: g = 0, and v must not be 0/0
    before = layer.weight.detach().clone()
    weight_normalize(layer)
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-7)
    layer(torch.randn(2, 3)).sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters())


def test_eval_is_deterministic_and_reads_do_not_iterate():
    layer = spectral_normalize(torch.nn.Linear(10, 10))
    first = layer.weight.detach().clone()
    for _ in range(5):
        torch.testing.assert_close(layer.weight, first, rtol=0, atol=0)
    layer.eval()
    layer(torch.randn(3, 10))
    torch.testing.assert_close(layer.weight, first, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(SpectrakitError, match="not a matrix"):
        spectral_normalize(torch.nn.LayerNorm(4))
    with pytest.raises(SpectrakitError, match="no tensor 'kernel'"):
        spectral_normalize(torch.nn.Linear(3, 3), name="kernel")
    layer = torch.nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(SpectrakitError, match="NaN"):
        weight_normalize(layer)
    with pytest.raises(SpectrakitError, match="mode"):
        learnable_multipliers(torch.nn.Linear(3, 3), "diagonal")
    with pytest.raises(SpectrakitError, match="not parametrized"):
        remove_parametrizations(torch.nn.Linear(3, 3))
