"""spectrakit.compress, second half: gfwsvd (Kronecker Fisher), svd-llm-v2 (two-SVD truncation,
heterogeneous ratios), ASVD's sensitivity search, lora_update, against float64 ground truth."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import spectrakit as sk
from spectrakit.compress import LowRankLinear
from spectrakit.compress.allocation import LayerShape, heterogeneous_ratios
from spectrakit.compress.calibration import collect_statistics
from spectrakit.compress.gfwsvd import kronecker_whitening
from spectrakit.errors import SpectrakitError


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).double()


def batches(count: int = 8, rows: int = 32, dim: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) for _ in range(count)]


def target_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fixed regression target, so the gradients are not all alike."""
    g = torch.Generator().manual_seed(7)
    target = torch.randn(x.shape[0], 10, generator=g, dtype=x.dtype)
    return (model(x) - target).square().mean()


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    return (layer.up @ layer.down).detach() if isinstance(layer, LowRankLinear) else layer.weight.detach()


# ---------------------------------------------------------------- gfwsvd

def test_gfwsvd_row_diagonal_special_case_is_fwsvd() -> None:
    calib = batches()
    one, two = mlp(), mlp()
    sk.compress(one, method="fwsvd", rank=3, calibration=calib, loss_fn=target_loss)
    sk.compress(two, method="gfwsvd", rank=3, calibration=calib, loss_fn=target_loss, factors="row-diagonal")
    for index in (0, 2):
        assert torch.allclose(dense_weight(one[index]), dense_weight(two[index]), rtol=1e-9, atol=1e-12)


def three_layers(seed: int = 0) -> torch.nn.Sequential:
    """Tall (16 × 12), square (16 × 16) and wide (10 × 16) layers: each of gfwsvd's routes."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 10)).double()


@pytest.mark.parametrize("svd_method", ["exact", "auto"])  # both Cholesky factors, or the smaller side through W = QR
def test_gfwsvd_kronecker_route_with_an_identity_column_factor_is_fwsvd(svd_method: str) -> None:
    # the general Kronecker code (not the row-diagonal shortcut): with B = s·I (an identity column factor after
    # the 1/s scaling) and A = diag(A), the two-sided whitening is FWSVD's D W, and W' must be FWSVD's
    from spectrakit.compress.fwsvd import FisherWeightedSVD
    from spectrakit.compress.gfwsvd import GeneralizedFisherWeightedSVD

    model = three_layers()
    names = {"0": model[0], "2": model[2], "4": model[4]}
    stats = collect_statistics(model, names, batches(), fisher=True, kronecker=True, loss_fn=target_loss)
    for name, layer in names.items():
        W = layer.weight.detach()
        s = stats[name]
        assert torch.allclose(s.row_fisher.diagonal(), s.fisher, rtol=1e-12)  # FWSVD's dᵢ² is diag(A)
        identity = copy.copy(s)
        identity.row_fisher = torch.diag(s.fisher)
        identity.column_fisher = float(s.fisher.sum()) * torch.eye(W.shape[1], dtype=torch.float64)
        for rank in (2, 5):
            general = GeneralizedFisherWeightedSVD().spectrum(name, W, identity, svd_method)
            fwsvd = FisherWeightedSVD().spectrum(name, W, s, "exact")
            assert torch.allclose(general.S, fwsvd.S, rtol=1e-9)
            up, down = general.factors(rank, torch.float64)
            up_f, down_f = fwsvd.factors(rank, torch.float64)
            assert torch.allclose(up @ down, up_f @ down_f, rtol=1e-8, atol=1e-11), (name, rank)
    # through compress as well, with the full factors: a genuine column factor changes the result
    one, two = three_layers(), three_layers()
    sk.compress(one, method="fwsvd", rank=3, calibration=batches(), loss_fn=target_loss)
    sk.compress(two, method="gfwsvd", rank=3, calibration=batches(), loss_fn=target_loss)
    assert not torch.allclose(dense_weight(one[2]), dense_weight(two[2]), atol=1e-6)


@pytest.mark.parametrize("layer", ["0", "2"])  # tall (16 × 12) and wide (10 × 16)
@pytest.mark.parametrize("svd_method", ["exact", "auto"])  # both factors whitened, or the smaller side only
def test_gfwsvd_loss_under_the_kronecker_fisher_is_the_dropped_spectrum(layer: str, svd_method: str) -> None:
    calib = batches()
    model = mlp()
    W = model[int(layer)].weight.detach().clone()
    twin = copy.deepcopy(model)
    stats = collect_statistics(twin, {layer: twin[int(layer)]}, calib, kronecker=True, loss_fn=target_loss)
    report = sk.compress(model, method="gfwsvd", rank=4, calibration=calib, loss_fn=target_loss, targets=[layer],
                         svd_method=svd_method)
    delta = W - dense_weight(model[int(layer)])
    # ground truth from the raw factors: vec(ΔW)ᵀ (B ⊗ A) vec(ΔW) / s = tr(ΔWᵀ A ΔW B) / s
    A, B = stats[layer].row_fisher, stats[layer].column_fisher
    s = float(A.trace())
    metric = float(torch.trace(delta.T @ A @ delta @ B)) / s
    C_A, C_B, reason = kronecker_whitening(stats[layer])
    assert reason == ""  # 8 batches of 32 rows: both factors are well conditioned, no ridge
    sigma = torch.linalg.svdvals(C_A.T @ W @ C_B)
    dropped = float(sigma[4:].square().sum())
    assert metric == pytest.approx(dropped, rel=1e-8)
    assert report.layers[layer].truncation_loss == pytest.approx(dropped, rel=1e-8)
    # and it is the best rank-4 choice under that metric: plain SVD's truncation costs more
    U, S, Vh = torch.linalg.svd(W)
    plain = W - U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    assert float(torch.trace(plain.T @ A @ plain @ B)) / s > dropped * 1.01


def test_gfwsvd_factors_match_autograd_per_sample_gradients() -> None:
    model = mlp()
    x = batches(1, rows=20)[0]
    samples = [x[i:i + 1] for i in range(x.shape[0])]  # one sample per calibration batch
    target = torch.randn(1, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def loss(m: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return (m(inputs) - target).square().mean()

    stats = collect_statistics(model, {"0": model[0], "2": model[2]}, samples, kronecker=True, loss_fn=loss)
    params = dict(model.named_parameters())

    def sample_loss(p: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
        return loss(lambda inputs: torch.func.functional_call(model, p, (inputs,)), row[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(params, x)
    for name in ("0", "2"):
        G = grads[f"{name}.weight"]  # [samples, out, in]
        assert torch.allclose(stats[name].row_fisher, torch.einsum("soi,spi->op", G, G), rtol=1e-10, atol=1e-14)
        assert torch.allclose(stats[name].column_fisher, torch.einsum("soi,soj->ij", G, G), rtol=1e-10, atol=1e-14)
        assert torch.allclose(stats[name].fisher, G.square().sum(dim=(0, 2)), rtol=1e-10, atol=1e-14)


def test_gfwsvd_without_a_gradient_is_one_line() -> None:
    model = mlp()
    with pytest.raises(SpectrakitError, match=r"^gfwsvd: layer 2 received no gradient"):
        sk.compress(model, method="gfwsvd", rank=2, calibration=batches(),
                    loss_fn=lambda m, x: m[1](m[0](x)).square().mean() + 0 * m[2](m[1](m[0](x))).detach().sum())
    with pytest.raises(SpectrakitError, match="factors="):
        sk.compress(mlp(), method="gfwsvd", rank=2, calibration=batches(), loss_fn=target_loss, factors="full")
    with pytest.raises(SpectrakitError, match=r"^calibration batch 0: the gfwsvd loss does not depend on the targeted"):
        sk.compress(mlp(), method="gfwsvd", rank=2, calibration=batches(), loss_fn=lambda m, x: m(x).sum().detach())
    with pytest.raises(SpectrakitError, match=r"^no default calibration loss \(fwsvd, gfwsvd, allocation="):
        sk.compress(mlp(), method="gfwsvd", rank=2, calibration=batches())


# ---------------------------------------------------------------- svd-llm-v2

@pytest.mark.parametrize("out, dtype", [(20, torch.float64), (30, torch.float64), (20, torch.float32)])
def test_svd_llm_v2_output_error_is_the_dropped_spectrum_without_damping(out: int, dtype: torch.dtype) -> None:
    # a wide layer through W XXᵀ Wᵀ (float64) or its calibration-time output Gram (float32), a tall one through W = QR
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, out)).to(dtype)
    # fewer tokens than inputs: XXᵀ is singular, which svd-llm damps and v2 does not need to
    X = torch.randn(16, 24, dtype=dtype)
    dense = model(X).detach().double()
    report = sk.compress(model, method="svd-llm-v2", rank=5, calibration=[X], allocation="uniform")
    error = float((model(X).detach().double() - dense).square().sum())
    sigma = torch.linalg.svdvals(dense - model[0].bias.detach().double())  # the singular values of W X
    tolerance = 1e-8 if dtype == torch.float64 else 1e-3
    assert error == pytest.approx(float(sigma[5:].square().sum()), rel=tolerance)
    assert report.layers["0"].truncation_loss == pytest.approx(error, rel=tolerance)


def shapes_of_one_type(seed: int = 0) -> dict[str, LayerShape]:
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for index, decay in enumerate((0.5, 0.8, 0.9, 0.95)):
        scale = 1 + torch.rand(1, generator=g, dtype=torch.float64)
        losses = (decay ** torch.arange(24, dtype=torch.float64)) * scale
        shapes[f"layers.{index}.q"] = LayerShape(24, 32, losses.square())
    for index in range(3):
        losses = torch.rand(16, generator=g, dtype=torch.float64).sort(descending=True).values
        shapes[f"layers.{index}.down"] = LayerShape(16, 40, losses)
    return shapes


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_heterogeneous_ratios_add_up_to_the_global_budget_exactly(ratio: float) -> None:
    shapes = shapes_of_one_type()
    ratios = heterogeneous_ratios(shapes, ratio)
    removed = sum(ratios[name] * shape.dense for name, shape in shapes.items())
    assert removed == pytest.approx(ratio * sum(shape.dense for shape in shapes.values()), rel=1e-12)
    # heterogeneous: the fastest-decaying q (lowest truncation loss) is compressed most
    q = [ratios[f"layers.{i}.q"] for i in range(4)]
    assert q == sorted(q, reverse=True) and q[0] > q[-1]


def test_heterogeneous_ratios_keep_every_loss_within_the_types_worst_at_the_uniform_rank() -> None:
    from spectrakit.compress.allocation import heterogeneous_ranks

    shapes = shapes_of_one_type()
    # nearly lossless at the uniform rank (9 at 30 %: its tail is 15 × 1e-12), but 8 large components:
    # the smallest loss of its type, so the largest ratio, which must stop where its loss would pass the worst
    planted = torch.cat([torch.full((8,), 100.0), torch.full((16,), 1e-12)]).double()
    shapes["layers.4.q"] = LayerShape(24, 32, planted)
    ratios, ranks = heterogeneous_ratios(shapes, 0.3), heterogeneous_ranks(shapes, 0.3)
    q = [name for name in shapes if name.endswith(".q")]
    uniform = math.floor(0.7 * 24 * 32 / 56)
    worst = max(float(shapes[name].losses[uniform:].sum()) for name in q)
    assert ranks["layers.4.q"] == 8  # not rank 1: below 8 its loss would be ≥ 100 > the worst (≈ 8)
    for name in q:
        assert float(shapes[name].losses[ranks[name]:].sum()) <= worst * (1 + 1e-12) or ranks[name] >= uniform
    removed = sum(ratios[name] * shapes[name].dense for name in q)
    assert removed == pytest.approx(0.3 * sum(shapes[name].dense for name in q), rel=1e-12)
    assert ratios["layers.4.q"] == max(ratios[name] for name in q)


def test_svd_llm_v2_layer_with_zero_truncation_loss_keeps_zero_loss() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 32)).double()
    with torch.no_grad():  # layer 2 has rank 2: no truncation loss above rank 2
        model[2].weight.copy_(torch.randn(32, 2, dtype=torch.float64) @ torch.randn(2, 32, dtype=torch.float64))
    X = torch.randn(400, 32, dtype=torch.float64)
    report = sk.compress(model, method="svd-llm-v2", ratio=0.5, calibration=[X])
    assert report.allocation == "heterogeneous"
    planted = report.layers["2"]
    assert planted.rank == 2 and planted.relative_loss < 1e-12  # zero up to float64 rounding
    assert report.layers["0"].rank > 8  # the uniform rank is 8: layer 2's share went to the others
    assert report.target_parameters_after <= 0.5 * report.target_parameters_before
    assert report.target_parameters_after >= 0.5 * report.target_parameters_before - 3 * 64


# ---------------------------------------------------------------- asvd's sensitivity search

class TwoBranches(torch.nn.Module):
    """``y = 10·a(x) + 0.1·b(x)``: a and b alike, but the loss is 10⁴× more sensitive to a."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.a(x) + 0.1 * self.b(x)


def test_sensitivity_search_gives_the_planted_sensitive_layer_the_higher_rank() -> None:
    model = TwoBranches()
    reference = copy.deepcopy(model)
    calib = [torch.randn(128, 32) for _ in range(2)]

    def loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (m(x) - reference(x)).square().mean()

    uniform = sk.compress(copy.deepcopy(model), method="asvd", ratio=0.5, calibration=calib)
    assert uniform.ranks["a"] == uniform.ranks["b"]
    report = sk.compress(model, method="asvd", ratio=0.5, calibration=calib, allocation="sensitivity", loss_fn=loss)
    assert report.ranks["a"] > report.ranks["b"]
    assert report.target_parameters_after <= 0.5 * report.target_parameters_before


# ---------------------------------------------------------------- lora_update

transformers = pytest.importorskip("transformers")


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, max_position_embeddings=64)).eval()


def token_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # a repeated pattern, so there is something to learn in a few steps
    pattern = torch.randint(0, 100, (12,), generator=g)
    return [torch.stack([pattern.roll(int(s)) for s in torch.randint(0, 12, (4,), generator=g)]).repeat(1, 2)
            for _ in range(3)]


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return float(torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1)))


def test_lora_update_lowers_the_calibration_loss_keeps_parameters_and_saves(tmp_path) -> None:
    calib = token_batches()
    plain, updated = llama(), llama()
    sk.compress(plain, method="svd-llm", ratio=0.4, calibration=calib)
    report = sk.compress(updated, method="svd-llm", ratio=0.4, calibration=calib, lora_update=True, lora_lr=1e-2,
                         lora_epochs=2)
    count = sum(p.numel() for p in updated.parameters())
    assert count == sum(p.numel() for p in plain.parameters()) == report.parameters_after
    before = sum(next_token_loss(plain, ids) for ids in calib)
    after = sum(next_token_loss(updated, ids) for ids in calib)
    assert after < before
    assert report.lora_loss_before == pytest.approx(before / len(calib), rel=1e-5)
    assert report.lora_loss_after == pytest.approx(after / len(calib), rel=1e-5)
    assert all(p.requires_grad for p in updated.parameters())  # flags restored
    sk.save_compressed(updated, tmp_path / "out", report)
    loaded = sk.load_compressed(tmp_path / "out")
    ids = calib[0][:1]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, updated(input_ids=ids).logits, atol=1e-5)
    generated = loaded.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_lora_update_bad_options_are_one_line() -> None:
    with pytest.raises(SpectrakitError, match="lora_update needs calibration"):
        sk.compress(llama(), method="svd", ratio=0.3, lora_update=True)
    with pytest.raises(SpectrakitError, match="lora_lr"):
        sk.compress(llama(), method="svd", ratio=0.3, lora_update=True, calibration=token_batches(), lora_lr=-1.0)


# ---------------------------------------------------------------- Monarch and BTT

def structured_matrix(out_features: int, in_features: int, blocks: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A matrix built block by block, each (c, a) block a product of random s×r and r×p factors."""
    g = torch.Generator().manual_seed(seed)
    s, p = out_features // blocks, in_features // blocks
    W = torch.zeros(out_features, in_features, dtype=torch.float64)
    for c in range(blocks):
        for a in range(blocks):
            W[c * s:(c + 1) * s, a * p:(a + 1) * p] = (torch.randn(s, rank, generator=g, dtype=torch.float64)
                                                         @ torch.randn(rank, p, generator=g, dtype=torch.float64))
    return W


@pytest.mark.parametrize(("kind", "blocks", "rank"), [("monarch", 4, 1), ("btt", 4, 2), ("btt", 2, 3)])
def test_structured_layers_reproduce_their_own_structure_exactly(kind: str, blocks: int, rank: int) -> None:
    from spectrakit.compress.structured import BlockTensorTrainLinear, MonarchLinear, build

    W = structured_matrix(24, 36, blocks, rank)
    bias = torch.randn(24, dtype=torch.float64)
    layer = build(kind, W, blocks, rank, bias, dtype=torch.float64)
    assert isinstance(layer, MonarchLinear if kind == "monarch" else BlockTensorTrainLinear)
    assert torch.allclose(layer.weight, W, atol=1e-12)
    x = torch.randn(5, 3, 36, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ W.T + bias, atol=1e-12)  # the forward is the same matrix
    assert sum(p.numel() for p in layer.parameters()) == rank * blocks * (24 + 36) + 24
    # and a matrix of another structure is only approximated: the projection is not the identity
    other = structured_matrix(24, 36, blocks, rank + 1, seed=1)
    assert not torch.allclose(build(kind if kind == "btt" else "btt", other, blocks, rank, None,
                                    dtype=torch.float64).weight, other, atol=1e-6)


def test_structured_compress_counts_exactly_and_saves(tmp_path) -> None:
    from spectrakit.compress.structured import BlockTensorTrainLinear, MonarchLinear

    for kind, cls in (("monarch", MonarchLinear), ("btt", BlockTensorTrainLinear)):
        model = llama()
        ids = token_batches()[0]
        report = sk.compress(model, method=kind, ratio=0.5)
        assert report.parameters_after == sum(p.numel() for p in model.parameters())
        low_rank = sk.compress(llama(), method="svd", ratio=0.5)
        for name, layer in report.layers.items():  # never more than low rank at the same ratio
            assert layer.parameters_after <= low_rank.layers[name].parameters_after or not layer.replaced
        replaced = [m for m in model.modules() if isinstance(m, cls)]
        assert replaced and all(sum(p.numel() for p in m.parameters()) == m.rank * m.blocks * (
            m.in_features + m.out_features) + m.out_features * (m.bias is not None) for m in replaced)
        sk.save_compressed(model, tmp_path / kind, report)
        loaded = sk.load_compressed(tmp_path / kind)
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_structured_sizes_that_do_not_factor_are_one_line() -> None:
    from spectrakit.compress.structured import MonarchLinear

    with pytest.raises(SpectrakitError, match=r"^MonarchLinear: in_features=30 does not split into 4 equal blocks"):
        MonarchLinear(30, 64, blocks=4)
    one_line = r"^layer model\.layers\.\d\.\S+: btt: \S+=\d+ does not split into 5 equal blocks"
    with pytest.raises(SpectrakitError, match=one_line):
        sk.compress(llama(), method="btt", ratio=0.5, blocks=5)
    with pytest.raises(SpectrakitError, match="takes ratio= or rank="):
        sk.compress(llama(), method="monarch", energy=0.9)


def one_warning(run) -> tuple[str, object]:
    """The CompressionWarning lines ``run()`` gives (exactly one expected) and its result."""
    import warnings

    from spectrakit.compress import CompressionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    lines = [str(w.message) for w in caught if issubclass(w.category, CompressionWarning)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0], result


def test_a_ratio_the_method_cannot_reach_is_one_line() -> None:
    # Monarch on 32 × 64 and 64 × 32 layers: the low-rank budget at 30 % holds 14·96 weights, Monarch's largest
    # fit is 8 blocks of rank 1 (768 of 2048): 62.5 % removed, far more than asked
    line, report = one_warning(lambda: sk.compress(llama(), method="monarch", ratio=0.3, targets=["mlp"]))
    assert line.startswith("monarch: ratio=0.3 is below what it can reach: a layer holds at most gcd(in, out) blocks")
    assert "62.5% of the targeted weights were removed" in line and report.ratio == pytest.approx(0.625)
    # BTT at 99 %: low rank keeps rank 1 (128 weights), BTT's smallest layer (8 blocks, rank 1) needs 1024
    line, report = one_warning(lambda: sk.compress(torch.nn.Sequential(torch.nn.Linear(64, 64)), method="btt",
                                                   ratio=0.99))
    assert line == ("btt: ratio=0.99 is out of reach: 1 of 1 layers (e.g. 0) have no btt structure within their "
                    "budget and stay dense, so only 0.0% of the targeted weights were removed")
    assert report.parameters_after == report.parameters_before
    # the low-rank methods keep rank 1 at least, and modegpt one dimension of each pair
    line, _ = one_warning(lambda: sk.compress(mlp(), method="svd-llm-v2", ratio=0.99, calibration=batches()))
    assert line.startswith("ratio=0.99 is out of reach: every layer keeps at least rank 1, so only ")
    line, report = one_warning(lambda: sk.compress(llama(), method="modegpt", ratio=0.99, calibration=token_batches(),
                                                   modules=("vo",)))
    assert line == ("modegpt: ratio=0.99 is out of reach: every pair keeps at least one dimension (two for rotary "
                    "query/key), so only 93.8% of the targeted weights were removed")
    assert report.ratio == pytest.approx(1 - 1 / 16)  # head_dim 16 keeps 1


# ---------------------------------------------------------------- modegpt (the MLP pair)

def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modegpt_full_width_reproduces_the_model_and_budgets_add_up(arch: str) -> None:
    build = {"llama": llama, "gpt2": gpt2}[arch]
    calib = token_batches()
    model, reference = build().double(), build().double()
    width = 64 if arch == "llama" else 128
    report = sk.compress(model, method="modegpt", rank=width, calibration=calib, modules=("mlp",))
    ids = calib[0]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    half = build()
    report = sk.compress(half, method="modegpt", ratio=0.5, calibration=calib, modules=["mlp"])
    assert report.parameters_after == sum(p.numel() for p in half.parameters())
    matrices = 3 if arch == "llama" else 2
    assert report.target_parameters_after == 2 * matrices * (width // 2) * 32  # 2 blocks, k = m/2, hidden 32
    assert report.target_parameters_before == 2 * matrices * width * 32
    assert all(layer.rank == width // 2 for layer in report.layers.values())


def test_modegpt_down_projection_is_the_least_squares_fit_on_the_kept_neurons() -> None:
    calib = token_batches()
    model = llama().double()
    inputs = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, output: inputs.append(args[0].reshape(-1, args[0].shape[-1]).detach()))
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids)
    handle.remove()
    H = torch.cat(inputs)
    target = H @ model.model.layers[0].mlp.down_proj.weight.detach().T
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    sk.compress(model, method="modegpt", ratio=0.5, calibration=calib, modules="mlp")
    mlp = model.model.layers[0].mlp
    kept = [int(torch.nonzero((gate == row).all(dim=1))[0]) for row in mlp.gate_proj.weight.detach()]
    best = torch.linalg.lstsq(H[:, kept], target).solution.T  # ground truth: least squares on the kept neurons
    assert torch.allclose(mlp.down_proj.weight.detach(), best, rtol=1e-6, atol=1e-8)


def test_modegpt_unknown_layout_and_unknown_pairs_are_one_line() -> None:
    with pytest.raises(SpectrakitError, match=r"^modegpt: Sequential has no MLP block of a known layout; supported: "
                                              r"Llama-style .*GPT-2-style"):
        sk.compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), method="modegpt", ratio=0.3,
                    calibration=[torch.randn(2, 4)])
    with pytest.raises(SpectrakitError, match="^modegpt: modules=\\('mlp', 'kq'\\): choose among 'mlp', 'qk', 'vo'$"):
        sk.compress(llama(), method="modegpt", ratio=0.3, calibration=token_batches(), modules=("mlp", "kq"))


@pytest.mark.parametrize("method", ["gfwsvd", "svd-llm-v2"])
def test_full_rank_is_lossless_for_the_new_methods(method: str) -> None:
    calib = batches()
    model, reference = mlp(), mlp()
    sk.compress(model, method=method, rank=16, calibration=calib, loss_fn=target_loss, only_if_smaller=False,
                allocation="uniform")
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2))
    x = torch.cat(calib)
    assert torch.allclose(model(x), reference(x), atol=1e-9)


# ---------------------------------------------------------------- the command line

def test_cli_passes_the_second_half_options(tmp_path, capsys) -> None:
    import json

    from spectrakit import data
    from spectrakit.cli import main

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(  # a tiny byte-level model: the options, not the time
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=256, max_position_embeddings=64)).save_pretrained(tmp_path / "src")
    (tmp_path / "code.txt").write_bytes(data.code_corpus("train", max_bytes=20_000))
    small = [str(tmp_path / "src"), "--calib", "4", "--seq-len", "32", "--batch-size", "2", "--quiet",
             "--calib-text", str(tmp_path / "code.txt")]
    out = tmp_path / "modegpt"
    assert main(["compress", "--method", "modegpt", "--modules", "mlp,vo", "--ratio", "0.25", *small,
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["modules"] == ["mlp", "vo"] and report["method"] == "modegpt"
    loaded = sk.load_compressed(out)
    assert report["parameters_after"] == sum(p.numel() for p in loaded.parameters())
    out = tmp_path / "lora"
    assert main(["compress", "--method", "svd", "--lora-update", "--lora-lr", "1e-3", "--lora-epochs", "2",
                 "--allocation", "global", *small, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["lora_epochs"] == 2 and report["lora_loss_after"] < report["lora_loss_before"]
    assert report["allocation"] == "global"
    out = tmp_path / "sensitivity"
    assert main(["compress", "--method", "asvd", "--allocation", "sensitivity", "--search-batches", "1",
                 "--alpha", "0.5", *small, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["allocation"] == "sensitivity"
    assert main(["compress", "--method", "gfwsvd", "--factors", "row-diagonal", *small,
                 "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert main(["compress", "--method", "svd-llm", "--factors", "kronecker", *small,
                 "--out", str(tmp_path / "bad")]) == 2
    assert "method 'svd-llm': bad option" in capsys.readouterr().err
    assert main(["compress", "--method", "modegpt", "--lora-update", *small, "--out", str(tmp_path / "bad")]) == 2
    assert "lora_update and search_batches apply to the low-rank methods" in capsys.readouterr().err
