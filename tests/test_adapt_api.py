"""spectrakit.adapt: PiSSA's optimality, bad input, mismatched bases, low-precision bases."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt import AdaptedLinear, read_adapter
from spectrakit.adapt.soma import annealed_weight_decay, set_weight_decay
from spectrakit.errors import SpectrakitError

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 40))


@pytest.mark.parametrize("method", ["pissa", "sorsa"])
def test_residual_is_eckart_young_optimal(method: str) -> None:
    model = gpt2()
    originals = {n: m.weight.detach().T.double().clone() for n, m in model.named_modules()
                 if type(m).__name__ == "Conv1D"}
    sk.adapt(model, method, rank=6)
    for name, W in originals.items():
        residual = model.get_submodule(name).base_layer.weight.detach().T.double()
        S = torch.linalg.svdvals(W)  # ground truth, float64
        optimum = math.sqrt(float((S[6:] ** 2).sum()))
        assert float(residual.norm()) <= 1.001 * optimum, name
        # and the adapter holds exactly the discarded part: residual + adapter = W
        merged = model.get_submodule(name).merged_weight().double()
        assert torch.allclose(merged, W, atol=1e-5)


def test_pissa_residual_on_a_decaying_spectrum_with_randomized_svd() -> None:
    torch.manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(300, 300))
    Q2, _ = torch.linalg.qr(torch.randn(256, 256))
    W = (Q1[:, :256] * 0.97 ** torch.arange(256.0)) @ Q2.T
    layer = torch.nn.Linear(256, 300, bias=False)
    layer.weight.data.copy_(W)
    model = sk.adapt(torch.nn.Sequential(layer), "pissa", rank=16, svd_method="randomized")
    S = torch.linalg.svdvals(W.double())
    optimum = math.sqrt(float((S[16:] ** 2).sum()))
    assert float(model[0].base_layer.weight.double().norm()) <= 1.001 * optimum


def test_milora_takes_the_smallest_components() -> None:
    model = mlp()
    W = model[0].weight.detach().double().clone()
    sk.adapt(model, "milora", rank=5)
    S = torch.linalg.svdvals(W)
    adapter = model[0]
    BA = (adapter.lora_B @ adapter.lora_A).double()
    assert torch.allclose(torch.linalg.svdvals(BA)[:5], S[-5:], rtol=1e-4)


def test_bad_input_gives_one_line_errors() -> None:
    with pytest.raises(SpectrakitError, match="unknown adapter method 'nope'"):
        sk.adapt(mlp(), "nope", rank=4)
    with pytest.raises(SpectrakitError, match=r"rank=48 must be an integer in 1\.\.47 for layer 0"):
        sk.adapt(mlp(), "lora", rank=48)
    with pytest.raises(SpectrakitError, match="rank=0"):
        sk.adapt(mlp(), "pissa", rank=0)
    with pytest.raises(SpectrakitError, match="target pattern 'q_proj' matches no"):
        sk.adapt(mlp(), "lora", rank=4, targets=["q_proj"])
    with pytest.raises(SpectrakitError, match="has no option 'alpah'"):
        sk.adapt(mlp(), "lora", rank=4, alpah=3)
    with pytest.raises(SpectrakitError, match="even rank"):
        sk.adapt(mlp(), "hra", rank=3)
    with pytest.raises(SpectrakitError, match="pattern='diag'"):
        sk.adapt(mlp(), "svft", rank=4, pattern="diag")
    with pytest.raises(SpectrakitError, match="needs calibration"):
        sk.adapt(mlp(), "eva", rank=4)
    with pytest.raises(SpectrakitError, match="no spectrakit adapters"):
        sk.merge(mlp())
    model = sk.adapt(mlp(), "lora", rank=4, targets=["0"])
    with pytest.raises(SpectrakitError, match="layer 0 is already adapted with 'lora'"):
        sk.adapt(model, "pissa", rank=4)
    with pytest.raises(SpectrakitError, match="layer 0 is already adapted"):
        sk.adapt(model, "svfit", rank=4, targets=["0"])
    sk.adapt(model, "svfit", rank=4, targets=["2"])  # the other layer is still free
    for error in ("unknown adapter method", "rank=", "matches no"):
        try:
            sk.adapt(mlp(), "nope" if "method" in error else "lora", rank=99 if error == "rank=" else 4,
                     targets=["x"] if "matches" in error else "all-linear")
        except SpectrakitError as caught:
            assert "\n" not in str(caught)


def test_failed_adapt_leaves_the_model_untouched() -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SpectrakitError):
        sk.adapt(model, "pissa", rank=45)  # fits layer 0 (48→64: limit 47) but not layer 2 (64→40)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.requires_grad for p in model.parameters())


def test_load_refuses_a_different_base(tmp_path) -> None:
    model = sk.adapt(mlp(seed=0), "pissa", rank=4)
    path = sk.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(SpectrakitError, match="base weight of layer 0 differs"):
        sk.load_adapter(mlp(seed=1), path)
    with pytest.raises(SpectrakitError, match="does not exist"):
        sk.load_adapter(mlp(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpectrakitError, match="cannot read adapter file"):
        sk.load_adapter(mlp(), tmp_path / "junk.safetensors")
    # loading into the already-adapted model works too
    sk.load_adapter(model, path)


def test_save_is_atomic_and_only_holds_trainable_tensors(tmp_path) -> None:
    model = sk.adapt(mlp(), "svfit", rank=4)
    path = sk.save_adapter(model, tmp_path / "sub" / "svfit.safetensors")
    config, tensors = read_adapter(path)
    assert sorted(tensors) == ["0.singular_values", "2.singular_values"]
    assert config["layers"]["0"]["rank"] == 4 and len(config["fingerprints"]["0"]) == 64
    assert [p.name for p in path.parent.iterdir()] == ["svfit.safetensors"]  # no temporary file left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "pissa", "svfit", "hra"])
def test_low_precision_base_with_fp32_adapters(method: str, dtype: torch.dtype) -> None:
    model = mlp().to(dtype)
    x = torch.randn(5, 48).to(dtype)
    with torch.no_grad():
        reference = model(x).float()
    sk.adapt(model, method, rank=4)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert model[0].base_layer.weight.dtype == dtype
    y = model(x)
    assert y.dtype == dtype
    assert float((y.detach().float() - reference).norm() / reference.norm()) < 2e-2  # base-dtype rounding only
    y.float().square().mean().backward()
    sk.merge(model)
    assert model[0].weight.dtype == dtype and type(model[0]) is torch.nn.Linear


def test_adapter_penalty_is_sorsa_orthonormality() -> None:
    model = sk.adapt(mlp(), "sorsa", rank=4)
    assert float(sk.adapter_penalty(model).detach()) < 1e-8  # singular vectors start orthonormal
    with torch.no_grad():
        model[0].U_p.mul_(2.0)
    expected = float(((4 * torch.eye(4) - torch.eye(4)) ** 2).sum())  # ‖(2U)ᵀ(2U) − I‖² = 9·4
    assert abs(float(sk.adapter_penalty(model).detach()) - expected) < 1e-3
    assert float(sk.adapter_penalty(sk.adapt(mlp(), "lora", rank=4))) == 0.0


def test_soma_weight_decay_schedule() -> None:
    values = [annealed_weight_decay(s, 10, start=0.1, end=0.01) for s in range(11)]
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(values, values[1:]))
    optimizer = torch.optim.AdamW(mlp().parameters(), weight_decay=0.5)
    set_weight_decay(optimizer, values[5])
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.055)


def test_all_linear_skips_the_tied_output_head() -> None:
    from spectrakit.adapt import find_targets

    names = set(find_targets(gpt2(), "all-linear"))
    assert "lm_head" not in names and len(names) == 8
    assert set(find_targets(gpt2(), ["c_attn"])) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert set(find_targets(gpt2(), ["transformer.h.1.*"])) == {
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj"}


def test_eva_ranks_follow_explained_variance() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    # inputs of layer 0 are nearly rank-2; of layer 1 (after a random map) spread out
    basis = torch.randn(2, 32)
    batches = [torch.randn(64, 2) @ basis + 1e-3 * torch.randn(64, 32) for _ in range(4)]
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0] * 3)
    sk.adapt(model, "eva", rank=4, calibration=batches, rho=2)
    ranks = [model[0].rank, model[1].rank]
    assert sum(ranks) == 8
    # A of layer 0 spans the two input directions
    A = model[0].lora_A.detach().double()
    projection = A.T @ torch.linalg.pinv(A.T)
    assert torch.allclose(projection @ basis.T.double(), basis.T.double(), atol=1e-2)


def test_bad_weights_and_options_fail_before_any_layer_changes() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    with pytest.raises(SpectrakitError, match=r"^2\.weight contains NaN or Inf values$"):
        sk.adapt(model, "pissa", rank=4)
    assert torch.equal(model[0].weight, before) and isinstance(model[0], torch.nn.Linear)
    with pytest.raises(SpectrakitError, match="variant='twist'"):
        sk.adapt(mlp(), "spectral", rank=4, variant="twist")
    with pytest.raises(SpectrakitError, match="n_frequencies=0"):
        sk.adapt(mlp(), "fourierft", rank=4, n_frequencies=0)
    with pytest.raises(SpectrakitError, match="freeze_blocks=3 leaves no layer"):
        sk.adapt(gpt2(), "soma", rank=4, freeze_blocks=3)


@pytest.mark.parametrize("method", ["lora", "pissa", "hra"])
def test_layers_read_through_weight_work(method: str) -> None:
    """nn.MultiheadAttention reads out_proj.weight instead of calling out_proj."""
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=48, dropout=0.0,
                                             batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        reference = model(x)
    sk.adapt(model, method, rank=4)
    assert isinstance(model.self_attn.out_proj, AdaptedLinear)
    with torch.no_grad():
        assert float((model(x) - reference).norm() / reference.norm()) < 1e-5
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        assert model.self_attn.out_proj.base_layer.weight.grad is None
        optimizer.step()
    with torch.no_grad():
        tuned = model(x)
        sk.merge(model)
        assert float((model(x) - tuned).norm() / tuned.norm()) < 1e-5


def test_residual_methods_refuse_a_tied_weight() -> None:
    with pytest.raises(SpectrakitError, match="layer lm_head: its weight is tied to transformer.wte.weight"):
        sk.adapt(gpt2(), "pissa", rank=4, targets=["lm_head"])
    model = sk.adapt(gpt2(), "lora", rank=4, targets=["lm_head"])  # leaves the shared weight alone
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight
