"""The second-half adapter methods, each against an explicit construction of its formula."""

from __future__ import annotations

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt.asymmetric import orthogonal_rows
from spectrakit.errors import SpectrakitError


def perturbed(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every trainable parameter off its initial value (the formulas are trivial at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def linear(out_f: int = 6, in_f: int = 9) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f).double()


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_balora_output_penalty_is_the_papers_terms_on_the_model_outputs(task: str) -> None:
    from spectrakit.adapt.balora import adapters_off, output_penalty

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(tokens).logits
    perturbed(sk.adapt(model, "ba-lora", rank=2, consistency=0.5, diversity=2.0, svd=3.0, svd_k=3, task=task), 0.05)
    Z = model(tokens).logits
    with torch.no_grad(), adapters_off(model):
        Z0 = model(tokens).logits
    assert torch.equal(Z0, reference)  # the pretrained model, from the same modules
    assert not torch.allclose(Z, Z0, atol=1e-4)
    z, z0 = Z.reshape(-1, 50).double(), Z0.reshape(-1, 50).double()
    if task == "nlg":
        consistency = torch.nn.functional.kl_div(z.log_softmax(-1), z0.softmax(-1), reduction="batchmean")
        p = z.softmax(-1)
        diversity = (p * p.log()).sum(-1).mean()
    else:
        consistency = ((z / z.norm(dim=-1, keepdim=True) - z0 / z0.norm(dim=-1, keepdim=True)) ** 2).mean()
        cov = torch.cov(z.T)
        diversity = ((cov - torch.diag(torch.diag(cov))) ** 2).sum() / 50
    S = torch.linalg.svdvals(z)
    expected = 0.5 * consistency + 2.0 * diversity - 3.0 * S[:3].sum() / S.sum()
    got = output_penalty(model, Z, Z0)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-7)
    assert float(sk.adapter_penalty(model)) == 0.0  # the model-level form keeps nothing per layer
    got.backward()
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.grad is not None and bool(layer.lora_A.grad.abs().sum() > 0)
    with pytest.raises(SpectrakitError, match="base_logits: shape"):
        output_penalty(model, Z, Z0[:1])
    with pytest.raises(SpectrakitError, match="no 'ba-lora' adapters"):
        output_penalty(torch.nn.Sequential(torch.nn.Linear(3, 3)), Z, Z0)


def test_asymmetric_a_is_frozen_orthonormal_and_slots_are_orthogonal() -> None:
    layer = linear()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "asymmetric", rank=3, slot=1, seed=4))
    adapted = model[0]
    A = adapted.lora_A
    assert not A.requires_grad and torch.allclose(A @ A.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(A, orthogonal_rows(9, 3, 1, 4).to(A))
    other = orthogonal_rows(9, 3, 0, 4)
    assert torch.allclose(other @ A.T, torch.zeros(3, 3, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 9, dtype=torch.float64)
    expected = x @ (layer.weight + adapted.lora_B @ A).T + layer.bias
    assert torch.allclose(model(x), expected)
    with pytest.raises(SpectrakitError, match="slot=3: layer 0 has room for 3 orthogonal slots"):
        sk.adapt(torch.nn.Sequential(linear()), "asymmetric", rank=3, slot=3)


def test_lorma_is_the_multiplicative_update() -> None:
    layer = linear()
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "lorma", rank=2, alpha=4))
    adapted = model[0]
    s = 4 / 2
    explicit = (torch.eye(6, dtype=torch.float64) + s * adapted.lora_B @ adapted.lora_A) @ W
    x = torch.randn(5, 9, dtype=torch.float64)
    assert torch.allclose(model(x), x @ explicit.T + b)
    assert torch.allclose(adapted.merged_weight(), explicit)


def _explicit_givens(layer: torch.nn.Module) -> torch.Tensor:
    """G = Π over layers of block-diagonal 2×2 rotations, built entry by entry."""
    d = layer.in_features
    G = torch.eye(d, dtype=torch.float64)
    for c, s, offset in layer._layers():
        L = torch.eye(d, dtype=torch.float64)
        for k in range(c.shape[0]):
            i, j = offset + 2 * k, offset + 2 * k + 1
            L[i, i], L[i, j], L[j, i], L[j, j] = c[k], -s[k], s[k], c[k]
        G = G @ L
    return G


@pytest.mark.parametrize("quasi", [False, True])
def test_qgoft_givens_product(quasi: bool) -> None:
    layer = linear(6, 9)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "qgoft", rank=2, quasi=quasi), scale=0.5)
    adapted = model[0]
    G = _explicit_givens(adapted)
    assert torch.allclose(adapted.rotation(), G, atol=1e-12)
    x = torch.randn(4, 9, dtype=torch.float64)
    assert torch.allclose(model(x), x @ (W @ G).T + b)
    assert torch.allclose(adapted.merged_weight(), W @ G)
    eye = torch.eye(9, dtype=torch.float64)
    if quasi:  # quasi-Givens: orthogonal exactly when the soft penalty vanishes
        assert float(sk.adapter_penalty(model).detach()) > 1e-3 and not torch.allclose(G @ G.T, eye, atol=1e-3)
        with torch.no_grad():
            norm = (adapted.cosines ** 2 + adapted.sines ** 2).sqrt()
            adapted.cosines.div_(norm)
            adapted.sines.div_(norm)
        assert float(sk.adapter_penalty(model).detach()) < 1e-20
        G = adapted.rotation()
    assert torch.allclose(G @ G.T, eye, atol=1e-12) and torch.allclose(G.T @ G, eye, atol=1e-12)


def test_balora_penalty_matches_the_explicit_terms() -> None:
    layer = linear(6, 9)
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "ba-lora", rank=2, consistency=0.5, diversity=2.0,
                               svd=3.0, svd_k=2, level="layer"))
    x = torch.randn(20, 9, dtype=torch.float64)
    y = model(x)
    y0 = layer(x).detach()
    consistency = ((y - y0) ** 2).mean()
    z = y - y.mean(0)
    C = (z.T @ z) / torch.outer(z.norm(dim=0), z.norm(dim=0))
    diversity = (C ** 2).sum() - (torch.diagonal(C) ** 2).sum()
    S = torch.linalg.svdvals(y)
    svd = -S[:2].sum() / S.sum()
    expected = 0.5 * consistency + 2.0 * diversity / 6 + 3.0 * svd
    got = sk.adapter_penalty(model)
    assert torch.allclose(got.double(), expected, rtol=1e-6)
    got.backward()  # differentiable down to the factors
    assert model[0].lora_A.grad is not None and bool(model[0].lora_A.grad.abs().sum() > 0)
    with torch.no_grad():  # an evaluation forward keeps nothing for the penalty
        model(x)
    assert float(sk.adapter_penalty(model).detach()) == 0.0


def test_sst_formula_rounds_and_sampling(tmp_path) -> None:
    from spectrakit.adapt.sst import _draw, resample_vectors

    layer = linear(6, 9)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = sk.adapt(torch.nn.Sequential(layer), "sst", rank=2, seed=3)
    adapted = model[0]
    x = torch.randn(4, 9, dtype=torch.float64)
    assert torch.allclose(model(x), x @ W.T + b, atol=1e-12)
    perturbed(model, 0.1)
    U, V = adapted.U.clone(), adapted.V.clone()
    U[:, adapted.selected], V[:, adapted.selected] = adapted.U_selected, adapted.V_selected
    explicit = (U * adapted.singular_values) @ V.T
    assert torch.allclose(model(x), x @ explicit.T + b)
    # a round keeps the weight, re-orthonormalizes the bases and draws again
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(x).sum().backward()
    optimizer.step()
    before, old = adapted.merged_weight().detach().clone(), adapted.selected.clone()
    assert resample_vectors(model, optimizer) == 1
    assert adapted.U_selected not in optimizer.state
    assert torch.allclose(adapted.merged_weight(), before, atol=1e-12)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(adapted.U.T @ adapted.U, eye, atol=1e-12)
    assert torch.allclose(adapted.V.T @ adapted.V, eye, atol=1e-12)
    assert torch.allclose(adapted.singular_values, torch.linalg.svdvals(before))
    assert adapted.round == 1 and old.shape == adapted.selected.shape
    # after a round the file carries the moved bases: load reproduces the layer bitwise
    sk.save_adapter(model, tmp_path / "sst.safetensors")
    fresh = sk.load_adapter(torch.nn.Sequential(linear(6, 9)), tmp_path / "sst.safetensors")
    assert torch.equal(fresh(x), model(x)) and fresh[0].round == 1
    # draws ∝ σ: one value ten times the others is picked 10/(10+5) of the time
    values = torch.tensor([10.0, 1, 1, 1, 1, 1])
    picks = torch.stack([_draw(values, 1, 0, i) for i in range(3000)]).flatten()
    assert abs(float((picks == 0).double().mean()) - 10 / 15) < 0.03


def test_sara_trains_the_smallest_weights_under_a_nuclear_norm() -> None:
    layer = linear(6, 9)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "sara", rank=2, fraction=0.2))
    adapted = model[0]
    k = round(0.2 * 54)
    threshold = W.abs().reshape(-1).sort().values[k - 1]
    mask = W.abs() <= threshold
    assert int(mask.sum()) == k == adapted.values.numel()
    delta = adapted.delta_weight()
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask])) and bool((delta[mask] != 0).all())
    x = torch.randn(4, 9, dtype=torch.float64)
    assert torch.allclose(model(x), x @ (W + delta).T + b)
    assert torch.allclose(sk.adapter_penalty(model).double(), torch.linalg.svdvals(delta).sum())


def test_soda_rotations_are_kronecker_orthogonal_and_the_update_matches() -> None:
    layer = linear(6, 8)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), "soda", rank=2, svd_method="gram"))
    adapted = model[0]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(adapted.sigma, S[:2])
    Q = {}
    for side, d in (("out", 6), ("in", 8)):
        first, second = adapted.rotations(side)
        Q[side] = torch.kron(first, second)
        eye = torch.eye(d, dtype=torch.float64)
        assert torch.allclose(Q[side] @ Q[side].T, eye, atol=1e-12) and not torch.allclose(Q[side], eye)
    explicit = (W - (adapted.U * adapted.sigma) @ adapted.V.T
                + (Q["out"] @ adapted.U * adapted.singular_values) @ (Q["in"] @ adapted.V).T)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.allclose(model(x), x @ explicit.T + b)
    assert torch.allclose(adapted.merged_weight(), explicit)


def test_dota_mpo_contracts_back_to_w_and_truncates_within_the_tt_bound() -> None:
    from spectrakit.adapt.dota import balanced_factors, mpo_contract, mpo_decompose

    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 36, generator=g, dtype=torch.float64)
    outs, ins = balanced_factors(24, 3), balanced_factors(36, 3)
    assert outs[0] * outs[1] * outs[2] == 24 and ins[0] * ins[1] * ins[2] == 36
    cores = mpo_decompose(W, outs, ins, bond=10_000)
    assert torch.allclose(mpo_contract(cores), W, atol=1e-12)
    # explicit contraction of the three cores, entry by entry over the bonds
    G1, G2, G3 = cores
    explicit = torch.einsum("aoib,bpjc,cqkd->opqijk", G1, G2, G3).reshape(24, 36)
    assert torch.allclose(explicit, W, atol=1e-12)
    # truncated: the error obeys the TT-SVD bound (the discarded tail at each bond)
    truncated = mpo_decompose(W, outs, ins, bond=3)
    error = float((mpo_contract(truncated) - W).norm())
    first = torch.linalg.svdvals(W.reshape(*outs, *ins).permute(0, 3, 1, 4, 2, 5).reshape(outs[0] * ins[0], -1))
    assert error >= float(first[3:].norm()) - 1e-9  # no better than the first cut alone allows
    layer = linear(8, 12)
    W8, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = sk.adapt(torch.nn.Sequential(layer), "dota", rank=2, cores=2)
    adapted = model[0]
    assert torch.allclose(mpo_contract(adapted.initial_cores()), mpo_contract(list(adapted.mpo)))
    perturbed(model)
    explicit = W8 - mpo_contract(adapted.initial_cores()) + mpo_contract(list(adapted.mpo))
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.allclose(model(x), x @ explicit.T + b)


def test_lqlora_nf4_residual_within_its_bound_and_memory() -> None:
    pytest.importorskip("torchao")
    from spectrakit.adapt.lqlora import lq_decompose, nf4_block_sizes, quantize_nf4

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    W = layer.weight.detach().clone()
    model = sk.adapt(torch.nn.Sequential(layer), "lq-lora", rank=4, iterations=3)
    adapted = model[0]
    low_rank = adapted.delta_weight().detach()
    residual = adapted.residual_weight()
    target = W - low_rank  # what was quantized
    q = adapted.residual.tensor
    block, _ = nf4_block_sizes(W.numel())
    absmax = target.reshape(-1, block).abs().amax(dim=1)
    scales = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size)
    codes = q.nf4.sort().values
    half_gap = float((codes[1:] - codes[:-1]).max()) / 2
    bound = half_gap * absmax + (absmax - scales).abs() + 1e-6  # nearest code, then the scale's rounding
    error = (residual - target).abs().reshape(-1, block)
    assert bool((error <= bound[:, None]).all())
    assert float(error.max()) > 0.1 * float(bound.min())  # the quantizer did round
    # round one: L is W's best rank-4 part (Q₀ = 0); more rounds never end worse than it
    U1, S1, Vh1, Q1 = lq_decompose(W, 4, 1)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    assert torch.allclose(((U1 * S1) @ Vh1).double(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)
    one_round = float((W - (U1 * S1) @ Vh1 - Q1.get_original_weight()).norm())
    assert float((W - low_rank - residual).norm()) <= one_round + 1e-7
    # the layer holds 4-bit codes, not the dense weight
    assert adapted.base_layer.weight.numel() == 0
    assert adapted.residual_bytes() < 0.6 * W.numel() < W.numel() * W.element_size()
    x = torch.randn(3, 64)
    assert torch.allclose(model(x), x @ (residual + low_rank).T + layer.bias, atol=1e-5)
    assert torch.equal(quantize_nf4(target).quantized_data, quantize_nf4(target).quantized_data)


def test_lqlora_without_torchao_names_the_extra(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(SpectrakitError, match=r"lq-lora needs torchao .* pip install 'spectrakit\[quant\]'"):
        sk.adapt(torch.nn.Sequential(torch.nn.Linear(16, 8)), "lq-lora", rank=2)


def test_clover_per_head_factors_reproduce_qk_and_vo_with_gqa() -> None:
    transformers = pytest.importorskip("transformers")
    from spectrakit.adapt.clover import attention_blocks, pair_transform

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32))
    (block,) = attention_blocks(llama)
    assert (block.heads, block.kv_heads, block.head_dim, block.rotary) == (4, 2, 8, True)
    attn = llama.model.layers[0].self_attn
    Wq, Wk = attn.q_proj.weight.detach().double(), attn.k_proj.weight.detach().double()
    Wv, Wo = attn.v_proj.weight.detach().double(), attn.o_proj.weight.detach().double()
    for g in range(2):  # key/value head g serves query heads 2g, 2g+1
        heads = (2 * g, 2 * g + 1)
        for left_of, right in ((lambda h: Wq[8 * h:8 * h + 8].T, Wk[8 * g:8 * g + 8]),
                               (lambda h: Wo[:, 8 * h:8 * h + 8], Wv[8 * g:8 * g + 8])):
            stacked = torch.cat([left_of(h) for h in heads])
            T, T_inv, s = pair_transform(stacked, right)
            assert torch.allclose(T @ T_inv, torch.eye(8, dtype=torch.float64), atol=1e-10)
            new_right = T @ right
            assert torch.allclose(new_right @ new_right.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
            new_left = stacked @ T_inv  # = U diag(s): orthogonal columns of norms s
            assert torch.allclose(new_left.T @ new_left, torch.diag(s ** 2), atol=1e-10)
            assert torch.allclose(s, torch.linalg.svdvals(stacked @ right)[:8])
            for h in heads:  # every head's own Q·Kᵀ (or W_o W_v) form is unchanged
                assert torch.allclose(left_of(h) @ T_inv @ new_right, left_of(h) @ right, atol=1e-10)
    with pytest.raises(SpectrakitError, match="rotary embeddings"):
        sk.adapt(llama, "clover", pairs="qk,vo")
    # in a model: GPT-2's fused c_attn, Q·Kᵀ per head from the adapted (merged) weights
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval().double()
    W = gpt2.transformer.h[0].attn.c_attn.weight.detach().double().T  # out × in, rows q | k | v
    model = perturbed(sk.adapt(gpt2, "clover"), 0.2)
    layer = model.transformer.h[0].attn.c_attn
    merged = layer.merged_weight().detach()
    for h in range(2):
        q, k = slice(16 * h, 16 * h + 16), slice(32 + 16 * h, 32 + 16 * h + 16)
        lam = layer.scales[h].detach()  # λ of key head h (k slots come first)
        T = layer.transforms[layer.blocks.index(32 + 16 * h)]
        assert torch.allclose(T @ W[k] @ (T @ W[k]).T, torch.eye(16, dtype=torch.float64), atol=1e-10)
        # merged Q·Kᵀ = W_qᵀ T⁻¹ diag(λ) T W_k: the original form with its singular values tuned
        expected = W[q].T @ torch.linalg.inv(T) @ torch.diag(lam) @ T @ W[k]
        assert torch.allclose(merged[q].T @ merged[k], expected, atol=1e-10)


FAST_PATHS = [("qgoft", {"rank": 2}), ("qgoft", {"rank": 2, "quasi": False}), ("sst", {}), ("soda", {}),
              ("dota", {}), ("sara", {"fraction": 0.3}), ("lorma", {}), ("lq-lora", {}), ("asymmetric", {}),
              ("ba-lora", {})]


@pytest.mark.parametrize(("method", "options"), FAST_PATHS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(FAST_PATHS)])
def test_forward_and_its_gradients_equal_the_merged_weight_formula(method: str, options: dict) -> None:
    """The forwards avoid forming ΔW (or fold it, or use a hand-written backward); outputs and every
    gradient must still be those of ``x (W + ΔW)ᵀ + b`` built by autograd from ``merged_weight``."""
    if method == "lq-lora":
        pytest.importorskip("torchao")
    options = dict(options)
    torch.manual_seed(1)
    layer = torch.nn.Linear(16, 12).double()
    model = perturbed(sk.adapt(torch.nn.Sequential(layer), method, rank=options.pop("rank", 3), **options), 0.2)
    adapted = model[0]
    params = [p for p in adapted.parameters() if p.requires_grad]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], g)
    expected = x @ adapted.merged_weight().T + layer.bias
    expected_grads = torch.autograd.grad(expected, [x, *params], g)
    assert torch.allclose(y, expected, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-9)


def test_hand_written_backwards_pass_gradcheck() -> None:
    from spectrakit.adapt.qgoft import _PairRotation, _partner
    from spectrakit.adapt.sst import _SpectralProduct

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    shear = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    for offset in (0, 1):  # odd width: each layout leaves a coordinate alone
        assert torch.autograd.gradcheck(_PairRotation.apply, (h, scale, shear, _partner(7, offset)))
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    U, V = torch.randn(4, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64, generator=g)
    index = torch.tensor([1, 3])
    values = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    U_sel = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    V_sel = torch.randn(7, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_SpectralProduct.apply, (x, values, U_sel, V_sel, U, V, index))


def test_fast_nf4_decode_is_torchaos_bitwise() -> None:
    pytest.importorskip("torchao")
    from spectrakit.adapt.lqlora import QuantizedResidual, quantize_nf4

    for shape in ((48, 20), (64, 6)):
        quantized = quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(2)))
        assert torch.equal(QuantizedResidual(quantized).dequantize(), quantized.get_original_weight())


def test_sara_progressive_reselection_freezes_the_grown_entries_and_round_trips(tmp_path) -> None:
    from spectrakit.adapt.sara import reselect_parameters

    layer = linear(6, 9)
    W = layer.weight.detach().clone()
    model = sk.adapt(torch.nn.Sequential(layer), "sara", rank=2, fraction=0.3)
    adapted = model[0]
    k = adapted.values.numel()
    threshold = W.abs().reshape(-1)[adapted.positions].max()
    with torch.no_grad():  # half of the entries grow past τ, half stay below it
        adapted.values.copy_(torch.where(torch.arange(k) % 2 == 0, 3 * threshold, 0.1 * threshold))
    optimizer = torch.optim.Adam(adapted.parameters(), lr=1e-2)
    x = torch.randn(4, 9, dtype=torch.float64)
    loss = model(x).square().sum() + 1e-3 * sk.adapter_penalty(model)
    loss.backward()  # `loss` stays referenced, as in a training loop: its graph nodes outlive the step
    optimizer.step()
    before_delta, before = adapted.delta_weight().detach().clone(), model(x).detach()
    current = W.reshape(-1)[adapted.positions] + adapted.values.detach()
    expected_kept = torch.nonzero(current.abs() <= threshold).reshape(-1)
    kept = reselect_parameters(model, optimizer)
    assert kept == len(expected_kept) == sk.trainable_parameters(model) and 0 < kept < k
    assert torch.equal(adapted.slots, expected_kept)
    assert torch.equal(model(x), before) and torch.equal(adapted.delta_weight(), before_delta)
    # only the kept entries train on; the frozen ones keep their values through an Adam step
    frozen = adapted.positions[~torch.isin(torch.arange(k), expected_kept)]
    assert any(p is adapted.values for p in optimizer.param_groups[0]["params"])  # swapped in
    for _ in range(2):  # with the penalty too (its graph once held the old δ)
        optimizer.zero_grad()
        (model(x).square().sum() + 1e-3 * sk.adapter_penalty(model)).backward()
        optimizer.step()
    after = adapted.delta_weight().detach().reshape(-1)
    assert torch.equal(after[frozen], before_delta.reshape(-1)[frozen])
    training = adapted.positions[expected_kept]
    assert not torch.equal(after[training], before_delta.reshape(-1)[training])
    # save / load: the split is part of the adapter
    sk.save_adapter(model, tmp_path / "sara.safetensors")
    fresh = sk.load_adapter(torch.nn.Sequential(linear(6, 9)), tmp_path / "sara.safetensors")
    assert sk.trainable_parameters(fresh) == kept and torch.equal(fresh(x), model(x))
    assert torch.equal(sk.merge(fresh)[0].weight, sk.merge(model)[0].weight)


def test_soda_stiefel_factors_stay_orthogonal_under_stiefel_sgd() -> None:
    from spectrakit.adapt.soda import StiefelSGD, stiefel_optimizer

    layer = linear(6, 8)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = sk.adapt(torch.nn.Sequential(layer), "soda", rank=2, orthogonal="stiefel")
    adapted = model[0]
    assert sk.trainable_parameters(model) == 2 + (2 * 2 + 3 * 3) + (2 * 2 + 4 * 4)  # 6 = 2·3, 8 = 2·4
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model(x), x @ W.T + b, atol=1e-12)
    optimizer = stiefel_optimizer(model, lr=0.05, adamw_lr=1e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.97 * losses[0]
    for Q in adapted.orthogonal_factors():
        assert not torch.allclose(Q, torch.eye(Q.shape[0], dtype=Q.dtype))  # it moved
        assert torch.allclose(Q @ Q.T, torch.eye(Q.shape[0], dtype=Q.dtype), atol=1e-12)
    assert not torch.equal(adapted.singular_values, adapted.sigma)  # AdamW moved the values
    assert torch.allclose(model(x), x @ adapted.merged_weight().T + b, atol=1e-12)
    # one step by hand: Q ← (I + η/2·A)⁻¹ (I − η/2·A) Q with A = G Qᵀ − Q Gᵀ (no momentum yet)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].requires_grad_()
    C = torch.randn(3, 3, dtype=torch.float64)
    (Q * C).sum().backward()
    G, Q0 = Q.grad.clone(), Q.detach().clone()
    StiefelSGD([Q], lr=0.1, momentum=0.9).step()
    A, eye = G @ Q0.T - Q0 @ G.T, torch.eye(3, dtype=torch.float64)
    assert torch.allclose(Q.detach(), torch.linalg.solve(eye + 0.05 * A, (eye - 0.05 * A) @ Q0), atol=1e-14)
    with pytest.raises(SpectrakitError, match="StiefelSGD steps square orthogonal matrices"):
        StiefelSGD([torch.nn.Parameter(torch.zeros(2, 3))])
    with pytest.raises(SpectrakitError, match="no 'soda' adapters with orthogonal='stiefel'"):
        stiefel_optimizer(sk.adapt(torch.nn.Sequential(linear(6, 8)), "soda", rank=2))
    with pytest.raises(SpectrakitError, match="orthogonal='givens' must be one of cayley, stiefel"):
        sk.adapt(torch.nn.Sequential(linear(6, 8)), "soda", rank=2, orthogonal="givens")


@pytest.mark.parametrize("method", ["asymmetric", "lorma", "qgoft", "ba-lora", "sst", "sara", "soda", "dota",
                                    "lq-lora"])
def test_bf16_base_keeps_its_dtype_through_the_fast_paths(method: str) -> None:
    if method == "lq-lora":
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.GELU(), torch.nn.Linear(24, 16)).to(torch.bfloat16)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        reference = model(x).float()
    sk.adapt(model, method, rank=1 if method == "qgoft" else 2)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    y = model(x)
    assert y.dtype == torch.bfloat16
    tolerance = 0.3 if method == "lq-lora" else 3e-2  # lq-lora: the NF4 residual's own error
    assert float((y.detach().float() - reference).norm() / reference.norm()) < tolerance
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.numel())
    merged = sk.merge(model)
    assert merged[0].weight.dtype == torch.bfloat16 and type(merged[0]) is torch.nn.Linear
