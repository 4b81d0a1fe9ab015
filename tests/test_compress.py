"""spectrakit.compress on plain torch layers: the SVD-LLM identity, whitening vs plain SVD,
full-rank exactness, calibration statistics against autograd, allocation, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import spectrakit as sk
from spectrakit.compress import CompressionWarning, LowRankLinear, break_even_rank
from spectrakit.compress.calibration import collect_statistics
from spectrakit.errors import SpectrakitError

METHODS = ["svd", "asvd", "fwsvd", "svd-llm"]


def correlated_inputs(n: int, dim: int, seed: int = 0, decay: float = 0.8) -> torch.Tensor:
    """Rows x = z·A with A = Q diag(decay^i) Qᵀ: strongly correlated features (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    A = (Q * decay ** torch.arange(dim, dtype=torch.float64)) @ Q.T
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ A + 0.05 * noise


def single_layer(in_features: int = 48, out_features: int = 40, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_features, out_features)).double()


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 24))


def square_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def test_svd_llm_truncation_aware_identity() -> None:
    X = correlated_inputs(600, 48)
    model = single_layer()
    W = model[0].weight.detach().clone()
    dense = model(X).detach()
    report = sk.compress(model, method="svd-llm", rank=8, calibration=[X[:300], X[300:]])
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 8
    error = float((model(X).detach() - dense).square().sum())
    # ground truth: float64 LAPACK SVD of W·S with S the Cholesky factor of XᵀX
    S = torch.linalg.cholesky(X.T @ X)
    sigma = torch.linalg.svdvals(W @ S)
    dropped = float(sigma[8:].square().sum())
    assert error == pytest.approx(dropped, rel=1e-8)
    assert report.layers["0"].truncation_loss == pytest.approx(dropped, rel=1e-8)


def test_svd_llm_on_a_float32_layer() -> None:
    """float32 weights and inputs with cond(XᵀX) = 1e8 (solved through a float64 Gram
    matrix): the output error on the calibration inputs is the dropped whitened spectrum
    of the float64 ground truth, and the report says so up to float32 statistics."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    X = (torch.randn(2000, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 48, dtype=torch.float64)
         @ Q).float()
    model = single_layer().float()
    W, wide = model[0].weight.detach().double(), X.double()
    dropped = float(torch.linalg.svdvals(W @ torch.linalg.cholesky(wide.T @ wide))[12:].square().sum())
    report = sk.compress(model, method="svd-llm", rank=12, calibration=[X])
    compressed = (model[0].up @ model[0].down).detach().double()
    assert float((wide @ (W - compressed).T).square().sum()) == pytest.approx(dropped, rel=1e-7)
    assert report.layers["0"].truncation_loss == pytest.approx(dropped, rel=1e-5)


def test_svd_llm_wide_layer_needs_no_whitening_factor() -> None:
    """A float32 layer with fewer outputs (24) than inputs (64), calibrated on 40 tokens:
    ``XᵀX`` is singular, so no Cholesky factor exists, yet the output route is exact, with
    no damping: the error on the calibration inputs is the dropped spectrum of ``W Xᵀ``."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 64, generator=g) * torch.logspace(0, -2, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    W = model[0].weight.detach().double()
    stats = collect_statistics(model, {"0": model[0]}, [X], gram=True, output_gram={"0": model[0].weight})
    assert stats["0"].gram is None and stats["0"].output_gram.shape == (24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        report = sk.compress(model, method="svd-llm", rank=6, calibration=[X[:25], X[25:]])
    sigma = torch.linalg.svdvals(W @ X.double().T)  # float64 ground truth
    dropped = float(sigma[6:].square().sum())
    compressed = (model[0].up @ model[0].down).detach().double()
    assert float((X.double() @ (W - compressed).T).square().sum()) == pytest.approx(dropped, rel=1e-5)
    assert report.layers["0"].truncation_loss == pytest.approx(dropped, rel=1e-4)


def test_svd_llm_output_route_resolves_small_directions_and_balances_factors() -> None:
    """A float32 wide layer whose singular values span 1 to 1e-6, rank 24 of 32 kept: the
    output second moment is formed in float64 from the inputs, so the kept subspace matches
    the float64 ground truth down there, where the layer's own float32 outputs are rounding."""
    g = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 32, generator=g, dtype=torch.float64))
    W = (U * torch.logspace(0, -6, 32, dtype=torch.float64)) @ V.T
    X = torch.randn(2000, 64, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    W = model[0].weight.detach().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)  # cond 1e12 from W alone is no reason to damp
        sk.compress(model, method="svd-llm", rank=24, calibration=[X], only_if_smaller=False)
    Y = X.double() @ W.T
    _, vectors = torch.linalg.eigh(Y.T @ Y)
    kept = vectors[:, -24:]
    truth = kept @ kept.T @ W
    compressed = (model[0].up @ model[0].down).detach().double()
    dropped = float((Y - X.double() @ truth.T).square().sum())
    assert float((Y - X.double() @ compressed.T).square().sum()) == pytest.approx(dropped, rel=1e-3)
    up_norms, down_norms = model[0].up.detach().norm(dim=0), model[0].down.detach().norm(dim=1)
    assert torch.allclose(up_norms, down_norms, rtol=1e-5)  # each component balanced


def test_svd_llm_output_route_damps_data_that_reaches_too_few_directions() -> None:
    """2,048 tokens but only 20 distinct inputs: (WX)(WX)ᵀ has rank 20 of 32, so the ridge
    λWWᵀ ranks the directions no token reached, with a warning."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(20, 64, generator=g)[torch.randint(0, 20, (2048,), generator=g)]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    W = model[0].weight.detach().double()
    with pytest.warns(CompressionWarning, match="output second moment is singular"):
        sk.compress(model, method="svd-llm", rank=24, calibration=[X], only_if_smaller=False)
    Y = X.double() @ W.T
    gram = Y.T @ Y
    ridge = 1e-2 * float(gram.trace()) / float(W.square().sum())
    _, vectors = torch.linalg.eigh(gram + ridge * W @ W.T)
    truth = vectors[:, -24:] @ vectors[:, -24:].T @ W
    compressed = (model[0].up @ model[0].down).detach().double()
    assert float((compressed - truth).norm() / W.norm()) < 1e-5


def test_svd_llm_wide_layer_of_low_rank_is_not_damped() -> None:
    """W itself of rank 16 (of 32 outputs) makes (WX)(WX)ᵀ singular, but not for want of
    data: no ridge, and the float64 whitening ground truth."""
    g = torch.Generator().manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 16, generator=g) @ torch.randn(16, 64, generator=g))
    W, X = model[0].weight.detach().double(), torch.randn(4000, 64, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        report = sk.compress(model, method="svd-llm", rank=8, calibration=[X])
    dropped = float(torch.linalg.svdvals(W @ torch.linalg.cholesky(X.double().T @ X.double()))[8:].square().sum())
    assert report.layers["0"].truncation_loss == pytest.approx(dropped, rel=1e-6)


def test_svd_llm_wide_layer_with_fewer_tokens_than_outputs_is_damped() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    x = torch.randn(10, 64)
    with pytest.warns(CompressionWarning, match="only 10 calibration tokens for 24 outputs"):
        sk.compress(model, method="svd-llm", rank=16, calibration=[x])
    assert torch.isfinite(model(x)).all()


def test_whitening_beats_plain_svd_on_correlated_inputs() -> None:
    X = correlated_inputs(800, 48, seed=1, decay=0.85)
    errors = {}
    for method in ("svd", "asvd", "svd-llm"):
        model = single_layer(seed=3)
        dense = model(X).detach()
        sk.compress(model, method=method, rank=6, calibration=[X])
        errors[method] = float((model(X).detach() - dense).square().sum())
    assert errors["svd-llm"] < 0.5 * errors["svd"], errors
    assert errors["svd-llm"] <= errors["asvd"] * (1 + 1e-9), errors  # optimal for the calibration inputs


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_is_lossless(method: str) -> None:
    model = mlp()
    x = torch.randn(256, 24)
    dense = model(x).detach()
    report = sk.compress(model, method=method, rank=64, calibration=[x[:128], x[128:]], loss_fn=square_loss,
                         only_if_smaller=False)
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2, 4))
    assert [layer.rank for layer in report.layers.values()] == [24, 32, 24]
    relative = float((model(x).detach() - dense).norm() / dense.norm())
    assert relative < 1e-5, relative


def test_layers_are_replaced_only_where_they_save_parameters() -> None:
    model = mlp()
    before = sum(p.numel() for p in model.parameters())
    report = sk.compress(model, method="svd", rank=12)
    # 24×64 breaks even at rank 17, 64×32 at 21, 32×24 at 13: all factorized at 12
    assert [type(model[i]).__name__ for i in (0, 2, 4)] == ["LowRankLinear"] * 3
    report = sk.compress(mlp(), method="svd", rank=14)
    assert [layer.replaced for layer in report.layers.values()] == [True, True, False]
    assert break_even_rank(24, 32) == 13
    assert report.parameters_before == before
    assert report.parameters_after == before - (24 * 64 + 64 * 32) + 14 * (24 + 64) + 14 * (64 + 32)


def test_layers_tied_to_each_other_are_left_alone_and_a_reused_layer_is_one_target(tmp_path) -> None:
    torch.manual_seed(0)
    tied = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 8))
    tied[2].weight = tied[0].weight
    report = sk.compress(tied, method="svd", rank=4)
    assert list(report.layers) == ["4"] and [type(m).__name__ for m in tied[::2]] == ["Linear", "Linear",
                                                                                       "LowRankLinear"]
    assert report.parameters_after == sum(p.numel() for p in tied.parameters())
    with pytest.raises(SpectrakitError, match="tied"):
        sk.compress(tied, method="svd", rank=4, targets=["2"])

    def reused() -> torch.nn.Sequential:
        torch.manual_seed(0)
        layer = torch.nn.Linear(32, 32)
        return torch.nn.Sequential(layer, torch.nn.ReLU(), layer, torch.nn.ReLU(), torch.nn.Linear(32, 8))

    model, x = reused(), torch.randn(64, 32)
    before = sum(p.numel() for p in model.parameters())
    report = sk.compress(model, method="svd-llm", rank=4, calibration=[x], targets=["2"])  # its second name
    assert list(report.layers) == ["0"] and model[0] is model[2] and isinstance(model[0], LowRankLinear)
    assert report.layers["0"].truncation_loss > 0 and report.calibration_tokens == 128  # both calls seen
    assert report.parameters_after == sum(p.numel() for p in model.parameters()) == before - 32 * 32 + 4 * 64
    sk.save_compressed(model, tmp_path / "reused", report)
    loaded = sk.load_compressed(tmp_path / "reused", model=reused())
    assert loaded[0] is loaded[2] and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_parameter_counts_and_budget(ratio: float, allocation: str) -> None:
    model = mlp()
    x = torch.randn(256, 24)
    before = sum(p.numel() for p in model.parameters())
    report = sk.compress(model, method="svd-llm", ratio=ratio, allocation=allocation, calibration=[x])
    assert report.parameters_before == before
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    targeted = 24 * 64 + 64 * 32 + 32 * 24
    assert report.target_parameters_before == targeted
    assert report.target_parameters_after <= (1 - ratio) * targeted
    assert report.ratio >= ratio
    # the budget is spent: one more rank anywhere would not fit (up to rank rounding)
    assert report.ratio < ratio + (64 + 32) / targeted * (3 if allocation == "uniform" else 1)


def test_global_allocation_loses_less_than_uniform() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(48, 48, bias=False) for _ in range(3)])
    with torch.no_grad():  # layer 0: fast-decaying spectrum, layer 2: flat
        for i, decay in enumerate((0.7, 0.9, 1.0)):
            U, _ = torch.linalg.qr(torch.randn(48, 48))
            V, _ = torch.linalg.qr(torch.randn(48, 48))
            model[i].weight.copy_((U * decay ** torch.arange(48.0)) @ V.T)
    losses = {}
    for allocation in ("uniform", "global"):
        clone = torch.nn.Sequential(*[torch.nn.Linear(48, 48, bias=False) for _ in range(3)])
        clone.load_state_dict(model.state_dict())
        report = sk.compress(clone, method="svd", ratio=0.5, allocation=allocation)
        losses[allocation] = sum(layer.truncation_loss for layer in report.layers.values())
        if allocation == "global":
            ranks = [layer.rank for layer in report.layers.values()]
            assert ranks[0] < ranks[1] < ranks[2], ranks
    assert losses["global"] < 0.8 * losses["uniform"], losses


def test_energy_picks_the_smallest_sufficient_rank() -> None:
    model = mlp()
    W = model[2].weight.detach().double()
    report = sk.compress(model, method="svd", energy=0.9, only_if_smaller=False)
    sigma2 = torch.linalg.svdvals(W).square()
    kept = torch.cumsum(sigma2, 0) / sigma2.sum()
    k = report.layers["2"].rank
    assert kept[k - 1] >= 0.9 > kept[k - 2]


def test_calibration_statistics_match_autograd() -> None:
    model = mlp().double()
    batches = [torch.randn(16, 24, dtype=torch.float64) for _ in range(3)]
    layers = {"0": model[0], "2": model[2]}
    stats = collect_statistics(model, layers, batches, gram=True, scale=True, fisher=True, loss_fn=square_loss)
    X = torch.cat(batches)
    assert torch.allclose(stats["0"].gram, X.T @ X)
    assert torch.allclose(stats["0"].mean_abs(), X.abs().mean(0))
    assert stats["0"].tokens == 48
    fisher = torch.zeros_like(model[2].weight)
    for x in batches:
        model.zero_grad()
        square_loss(model, x).backward()
        fisher += model[2].weight.grad.square()
    assert torch.allclose(stats["2"].fisher, fisher.sum(dim=1), rtol=1e-10, atol=0)
    model.zero_grad(set_to_none=True)
    collect_statistics(model, layers, batches, fisher=True, loss_fn=square_loss)
    assert model[0].weight.grad is None and all(p.requires_grad for p in model.parameters())
    assert not any(x.requires_grad for x in batches)  # the first layer's input was a root for the pass
    leaf = batches[0].clone().requires_grad_(True)  # a batch that requires grad itself: no root is marked
    fisher_one = torch.zeros_like(model[2].weight)
    square_loss(model, leaf).backward()
    fisher_one += model[2].weight.grad.square()
    model.zero_grad(set_to_none=True)
    stats = collect_statistics(model, layers, [leaf], fisher=True, loss_fn=square_loss)
    assert torch.allclose(stats["2"].fisher, fisher_one.sum(dim=1), rtol=1e-10, atol=0) and leaf.requires_grad


class _Branches(torch.nn.Module):
    """b's input requires grad only through `prompt`, a tensor outside the parameters; `scale`
    overwrites the input of layer l in place after l used it (when `in_place`)."""

    def __init__(self, prompt: torch.Tensor, in_place: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.b, self.l, self.o = (torch.nn.Linear(8, 8).double() for _ in range(5))
        self.prompt, self.in_place = prompt, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.b(self.pre(x) + self.prompt)
        h = self.a(x)
        y = self.l(h)
        h = h.mul_(3) if self.in_place else h * 3
        return self.o(y + h + v)


def test_fisher_edge_cases_are_right_or_refused() -> None:
    x = torch.randn(5, 8, dtype=torch.float64)
    prompt = torch.randn(8, dtype=torch.float64, requires_grad=True)
    model = _Branches(prompt)
    square_loss(model, x).backward()
    expected = {name: getattr(model, name).weight.grad.square() for name in "abl"}
    model.zero_grad(set_to_none=True)
    prompt.grad = None
    layers = {name: getattr(model, name) for name in "abl"}
    stats = collect_statistics(model, layers, [x], fisher=True, loss_fn=square_loss)
    for name in "abl":  # b's gradient comes through `prompt`, not through a marked input
        assert torch.allclose(stats[name].fisher, expected[name].sum(dim=1), rtol=1e-10, atol=0), name
    assert prompt.grad is None and not x.requires_grad
    in_place = _Branches(prompt, in_place=True)
    with pytest.raises(SpectrakitError, match="layer l was modified in place"):
        collect_statistics(in_place, {"a": in_place.a, "l": in_place.l}, [x], fisher=True, loss_fn=square_loss)
    with pytest.raises(SpectrakitError, match="calibration batch 0: fwsvd cannot differentiate"):
        # l's input is then the tensor made to require grad, and the model writes into it
        collect_statistics(in_place, {"l": in_place.l}, [x], fisher=True, loss_fn=square_loss)
    with pytest.raises(SpectrakitError, match="does not depend on the targeted layers"):
        collect_statistics(model, layers, [x], fisher=True, loss_fn=lambda m, b: m(b).detach().square().mean())


def test_fisher_of_a_layer_called_twice_squares_the_batch_gradient() -> None:
    """A shared block (ALBERT-style): the batch's weight gradient is the sum over its calls,
    and that sum is squared, not each call's part."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8).double()
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared, torch.nn.Tanh(), torch.nn.Linear(8, 4).double())
    batches = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    expected = torch.zeros(8, dtype=torch.float64)
    for x in batches:
        model.zero_grad()
        square_loss(model, x).backward()
        expected += shared.weight.grad.square().sum(dim=1)
    model.zero_grad(set_to_none=True)
    stats = collect_statistics(model, {"0": shared}, batches, fisher=True, loss_fn=square_loss)
    assert torch.allclose(stats["0"].fisher, expected, rtol=1e-10, atol=0)


def test_svd_llm_float64_weight_keeps_the_exact_svd() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(torch.randn(48, 64, generator=g, dtype=torch.float64), full_matrices=False)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False).double())
    with torch.no_grad():  # σ from 1 down to 1e-12: a Gram route would lose the lower half
        model[0].weight.copy_(U @ torch.diag(torch.logspace(0, -12, 48, dtype=torch.float64)) @ Vh)
    W = model[0].weight.detach().clone()
    sk.compress(model, method="svd-llm", rank=48, calibration=[X], only_if_smaller=False)
    assert float((model[0].up @ model[0].down - W).detach().norm() / W.norm()) < 1e-12


def test_low_rank_linear_forward_and_weight() -> None:
    torch.manual_seed(0)
    up, down, bias = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    layer = LowRankLinear.from_factors(up, down, bias)
    x = torch.randn(4, 5)
    assert torch.allclose(layer(x), x @ (up @ down).T + bias, atol=1e-6)
    assert torch.allclose(layer.weight, up @ down)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 6) + 6


# ----- bad input -------------------------------------------------------------------------------

def test_nan_calibration_is_an_error() -> None:
    x = torch.randn(64, 24)
    x[3, 5] = float("nan")
    for method in ("asvd", "svd-llm", "fwsvd"):
        with pytest.raises(SpectrakitError, match="NaN"):
            sk.compress(mlp(), method=method, ratio=0.3, calibration=[x], loss_fn=square_loss)


def test_nan_inside_the_model_names_the_layer() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = float("nan")  # an untargeted layer that breaks the activations
    with pytest.raises(SpectrakitError, match="layer 4"):
        sk.compress(model, method="svd-llm", ratio=0.3, calibration=[torch.randn(64, 24)], targets=["4"])


def test_too_few_tokens_damps_with_a_warning() -> None:
    model = mlp()
    x = torch.randn(10, 24)  # 10 tokens for 24, 64 and 32 input features
    dense = model(x).detach()
    with pytest.warns(CompressionWarning, match="only 10 calibration tokens"):
        sk.compress(model, method="svd-llm", ratio=0.3, calibration=[x])
    out = model(x).detach()
    assert torch.isfinite(out).all()
    assert float((out - dense).norm() / dense.norm()) < 1.0


def test_enough_tokens_gives_no_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sk.compress(mlp(), method="svd-llm", ratio=0.3, calibration=[torch.randn(512, 24)])
    assert [str(w.message) for w in caught if issubclass(w.category, CompressionWarning)] == []
    assert report.parameters_after < report.parameters_before


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5, float("nan")])
def test_ratio_outside_the_open_interval(ratio: float) -> None:
    with pytest.raises(SpectrakitError, match="ratio"):
        sk.compress(mlp(), method="svd", ratio=ratio)


def test_other_budget_and_option_errors() -> None:
    with pytest.raises(SpectrakitError, match="exactly one"):
        sk.compress(mlp(), method="svd", ratio=0.3, rank=4)
    with pytest.raises(SpectrakitError, match="exactly one"):
        sk.compress(mlp(), method="svd")
    with pytest.raises(SpectrakitError, match="energy"):
        sk.compress(mlp(), method="svd", energy=1.5)
    with pytest.raises(SpectrakitError, match="method"):
        sk.compress(mlp(), method="tucker", ratio=0.3)
    with pytest.raises(SpectrakitError, match="calibration"):
        sk.compress(mlp(), method="svd-llm", ratio=0.3)
    with pytest.raises(SpectrakitError, match="allocation"):
        sk.compress(mlp(), method="svd", ratio=0.3, allocation="greedy")
    with pytest.raises(SpectrakitError, match="loss"):
        sk.compress(mlp(), method="fwsvd", ratio=0.3, calibration=[torch.randn(8, 24)])
    with pytest.raises(SpectrakitError, match="iterable of batches"):
        sk.compress(mlp(), method="svd-llm", ratio=0.3, calibration=5)
    with pytest.raises(SpectrakitError, match="svd_method='bogus' is not one of"):
        sk.compress(mlp(), method="svd", ratio=0.3, svd_method="bogus")


def test_numpy_scalars_are_budgets_and_an_unreachable_ratio_warns() -> None:
    np = pytest.importorskip("numpy")
    assert sk.compress(mlp(), method="svd", ratio=np.float32(0.3)).budget == {"ratio": pytest.approx(0.3)}
    assert set(sk.compress(mlp(), method="svd", rank=np.int64(4)).ranks.values()) == {4}
    with pytest.warns(CompressionWarning, match="ratio=0.99 is out of reach"):
        report = sk.compress(mlp(), method="svd", ratio=0.99)
    assert set(report.ranks.values()) == {1} and report.ratio < 0.99


def test_target_that_is_not_a_matrix() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 24))
    with pytest.raises(SpectrakitError, match="not the weight matrix"):
        sk.compress(model, method="svd", ratio=0.3, targets=["1"])
    with pytest.raises(SpectrakitError, match="not the weight matrix"):
        sk.compress(model, method="svd", ratio=0.3, targets=["0.weight"])
    with pytest.raises(SpectrakitError, match="matches no layer"):
        sk.compress(model, method="svd", ratio=0.3, targets=["q_proj"])
    sk.compress(model, method="svd", ratio=0.5, targets=["2"])
    with pytest.raises(SpectrakitError, match="not the weight matrix"):  # already low-rank
        sk.compress(model, method="svd", ratio=0.3, targets=["2"])


def test_bad_weights_are_refused_before_anything_changes() -> None:
    model = mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(SpectrakitError, match="4.weight contains NaN"):
        sk.compress(model, method="svd", ratio=0.3)
    assert isinstance(model[0], torch.nn.Linear)
    int_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    int_model[0].weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SpectrakitError, match="not floating point"):
        sk.compress(int_model, method="svd", ratio=0.3)


def test_fisher_of_tiny_gradients_does_not_underflow() -> None:
    # float32 squares vanish below |g| ≈ 1e-19; the row sums are formed in float64
    model = mlp()
    batches = [torch.randn(16, 24) for _ in range(2)]
    layers = {"2": model[2]}
    plain = collect_statistics(model, layers, batches, fisher=True, loss_fn=square_loss)["2"].fisher
    tiny = collect_statistics(model, layers, batches, fisher=True,
                              loss_fn=lambda m, x: 1e-22 * square_loss(m, x))["2"].fisher
    assert bool((tiny > 0).all()) and torch.allclose(tiny * 1e44, plain, rtol=1e-4)


class _Reuse(torch.nn.Module):
    """q/k/v read one tensor (k once more at the end); `twice` reads one tensor two times;
    `again` reads h, then another tensor, then q reads h too (it must get h's products, not
    `again`'s running sum)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.twice, self.again = (torch.nn.Linear(6, 6) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) + self.k(x) + self.v(x)
        h = self.twice(h) + self.twice(h)
        return self.again(h) + self.again(torch.tanh(h)) + self.q(h) + self.k(x)


def test_statistics_of_shared_and_reused_inputs_are_exact() -> None:
    model = _Reuse()
    batches = [torch.randn(5, 6) for _ in range(4)]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in "q k v twice again".split()}
    handles = [getattr(model, name).register_forward_hook(
        lambda module, inputs, output, name=name: seen[name].append(inputs[0].detach().double()))
        for name in seen]
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    layers = {name: getattr(model, name) for name in seen}
    stats = collect_statistics(model, layers, batches, gram=True, scale=True)
    for name, inputs in seen.items():
        X = torch.cat(inputs)
        assert stats[name].tokens == X.shape[0], name
        assert torch.allclose(stats[name].gram, X.T @ X, rtol=1e-6, atol=1e-6), name
        assert torch.allclose(stats[name].abs_sum, X.abs().sum(0), rtol=1e-6, atol=1e-6), name
    assert stats["q"].gram is not stats["v"].gram  # each layer owns its accumulator


def test_progress_bars_cover_calibration_and_layers(capsys: pytest.CaptureFixture[str]) -> None:
    tqdm = pytest.importorskip("tqdm")  # noqa: F841 - the bar text comes from tqdm
    model = mlp()
    sk.compress(model, method="svd-llm", rank=4, calibration=[torch.randn(64, 24) for _ in range(3)], progress=True)
    err = capsys.readouterr().err
    assert "calibration" in err and "/3 " in err and "batch" in err and "compress svd-llm" in err
    sk.compress(mlp(), method="asvd", rank=4, calibration=torch.randn(64, 24), progress=False)
    assert capsys.readouterr().err == ""


class _WritesBetweenReaders(torch.nn.Module):
    """`a` and `b` read the same tensor object, which the model scales in place in between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.b = (torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        y = self.a(h)
        h.mul_(3)
        return y + self.b(h)


def test_an_input_written_in_place_between_readers_is_read_again() -> None:
    model = _WritesBetweenReaders()
    batches = [torch.randn(5, 6) for _ in range(3)]
    stats = collect_statistics(model, {"a": model.a, "b": model.b}, batches, gram=True)
    with torch.no_grad():
        H = torch.cat([model.pre(x) for x in batches]).double()
    assert torch.allclose(stats["a"].gram, H.T @ H, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats["b"].gram, 9 * H.T @ H, rtol=1e-6, atol=1e-6)
