"""merge_adapters (linear, task arithmetic, TIES, DARE, SVD), orthogonal adaptation and FedSVD,
against explicit constructions in float64."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt import combine_updates, federated_client, federated_round, merge_adapters, read_adapter
from spectrakit.adapt.base import AdaptedLinear
from spectrakit.errors import SpectrakitError

transformers = pytest.importorskip("transformers")

def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``out × in`` weights of the layers merge_adapters can touch."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            found[name] = module.weight.detach().T.double()
    return found


def trained(method: str, data_seed: int, steps: int = 2, **options) -> torch.nn.Module:
    model = sk.adapt(gpt2(), method, rank=4, **options)
    generator = torch.Generator().manual_seed(data_seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 100, (2, 12), generator=generator)
        optimizer.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    return model


def deltas(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight().detach().double() for n, m in adapter.named_modules() if isinstance(m, AdaptedLinear)}


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory) -> tuple[list, list[dict[str, torch.Tensor]]]:
    folder = tmp_path_factory.mktemp("adapters")
    first, second = trained("lora", 1), trained("pissa", 2)
    sk.save_adapter(first, folder / "a.safetensors")
    sk.save_adapter(second, folder / "b.safetensors")
    # a pissa layer's task vector is its merged weight minus the original weight
    base = weights(gpt2())
    second_tau = {n: m.merged_weight().detach().double() - base[n]
                  for n, m in second.named_modules() if isinstance(m, AdaptedLinear)}
    return [folder / "a.safetensors", folder / "b.safetensors"], [deltas(first), second_tau]


@pytest.mark.parametrize(("method", "given", "effective"), [
    ("linear", None, (0.5, 0.5)), ("linear", (3.0, 1.0), (0.75, 0.25)),
    ("task-arithmetic", None, (1.0, 1.0)), ("task-arithmetic", (0.7, -0.2), (0.7, -0.2))])
def test_linear_and_task_arithmetic_are_the_weighted_sums(two_adapters, method, given, effective) -> None:
    paths, taus = two_adapters
    base = weights(gpt2())
    merged = weights(merge_adapters(gpt2(), paths, method=method, weights=given))
    for name, W in base.items():
        expected = W + effective[0] * taus[0][name] + effective[1] * taus[1][name]
        assert torch.allclose(merged[name], expected, atol=2e-6), name


def test_svd_merge_is_the_eckart_young_optimum(two_adapters) -> None:
    paths, taus = two_adapters
    model = merge_adapters(gpt2(), paths, method="svd", rank=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert layers and all(m.method == "lora" and m.rank == 3 for m in layers.values())
    for name, layer in layers.items():
        total = taus[0][name] + taus[1][name]
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        optimum = (U[:, :3] * S[:3]) @ Vh[:3]
        got = layer.delta_weight().detach().double()
        assert torch.allclose(got, optimum, atol=1e-5 * float(S[0])), name
        # and no rank-3 matrix does better: the error is the tail of the spectrum
        assert abs(float((total - got).norm()) - float(S[3:].norm())) < 1e-5 * float(S[0])


def test_ties_and_dare_match_their_explicit_construction() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    w = (1.0, 0.5, 2.0)
    # TIES by hand, entry by entry
    trimmed = []
    for wi, t in zip(w, (a, b, c)):
        keep = torch.zeros_like(t).reshape(-1)
        order = t.abs().reshape(-1).argsort(descending=True)[:15]  # density 0.5 of 30 entries
        keep[order] = 1
        trimmed.append(wi * t * keep.reshape(t.shape))
    expected = torch.zeros_like(a)
    for i in range(6):
        for j in range(5):
            values = [t[i, j].item() for t in trimmed]
            sign = 1.0 if sum(values) > 0 else -1.0
            agreeing = [v for v in values if v != 0 and (v > 0) == (sign > 0)]
            expected[i, j] = sum(agreeing) / max(1, len(agreeing))
    assert torch.allclose(combine_updates([a, b, c], "ties", w, density=0.5), expected)
    # DARE: density 1 is task arithmetic; otherwise each survivor is rescaled by 1/density
    assert torch.allclose(combine_updates([a, b], "dare", (1.0, 1.0), density=1.0), a + b)
    dropped = combine_updates([a], "dare", (1.0,), density=0.5, seed=3)
    kept = dropped != 0
    assert 0 < int(kept.sum()) < a.numel()
    assert torch.allclose(dropped[kept], 2 * a[kept])
    assert torch.equal(dropped, combine_updates([a], "dare", (1.0,), density=0.5, seed=3))


def test_orthogonal_adapters_sum_without_interference() -> None:
    first = trained("asymmetric", 1, slot=0, seed=7)
    second = trained("asymmetric", 2, slot=1, seed=7)
    taus = [deltas(first), deltas(second)]
    merged = weights(merge_adapters(gpt2(), [first, second], method="task-arithmetic"))
    base = weights(gpt2())
    for name, W in base.items():
        A = [dict(m.named_modules())[name].lora_A.double() for m in (first, second)]
        assert torch.allclose(A[0] @ A[1].T, torch.zeros(4, 4, dtype=torch.float64), atol=1e-6)  # float32 storage
        change = merged[name] - W
        for i in range(2):  # on adapter i's input subspace the sum acts exactly as adapter i alone
            assert torch.allclose(change @ A[i].T, taus[i][name] @ A[i].T, atol=1e-6), name
    # and an SVD merge at the summed rank loses nothing
    exact = merge_adapters(gpt2(), [first, second], method="svd", rank=8)
    for name, layer in exact.named_modules():
        if isinstance(layer, AdaptedLinear):
            total = taus[0][name] + taus[1][name]
            assert torch.allclose(layer.delta_weight().double(), total, atol=1e-6)


def test_bad_input_is_one_line(two_adapters, tmp_path) -> None:
    paths, _ = two_adapters
    other = gpt2()
    with torch.no_grad():
        other.transformer.h[0].attn.c_attn.weight.add_(1e-3)
    with pytest.raises(SpectrakitError, match="base weight of layer transformer.h.0.attn.c_attn differs"):
        merge_adapters(other, paths)
    with pytest.raises(SpectrakitError, match="rank=32 must be below 32 for layer"):
        merge_adapters(gpt2(), paths, method="svd", rank=32)
    with pytest.raises(SpectrakitError, match="method='svd' needs rank="):
        merge_adapters(gpt2(), paths, method="svd")
    with pytest.raises(SpectrakitError, match="weights has 1 entries for 2 adapters"):
        merge_adapters(gpt2(), paths, weights=[1.0])
    with pytest.raises(SpectrakitError, match="method='mean' must be one of"):
        merge_adapters(gpt2(), paths, method="mean")
    with pytest.raises(SpectrakitError, match="already has adapters"):
        merge_adapters(sk.adapt(gpt2(), "lora", rank=2), paths)
    # same base, a layer of another shape in the file
    config, tensors = read_adapter(paths[0])
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = torch.zeros(5, tensors[key].shape[1])
    with pytest.raises(SpectrakitError, match=f"tensor {key} has shape \\(5, 32\\)"):
        merge_adapters(gpt2(), [(config, tensors)])


def test_fedsvd_round_orthonormal_a_and_best_rank_r_product() -> None:
    server = sk.adapt(gpt2(), "lora", rank=4, alpha=8)
    clients = []
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        client = copy.deepcopy(server)  # clients that also moved A: the average has rank > r
        with torch.no_grad():
            for layer in client.modules():
                if isinstance(layer, AdaptedLinear):
                    layer.lora_A.add_(0.1 * torch.randn(layer.lora_A.shape, generator=generator))
                    layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=generator))
        clients.append(client)
    averaged = {n: sum(dict(c.named_modules())[n].delta_weight().detach().double() for c in clients) / 3
                for n, m in server.named_modules() if isinstance(m, AdaptedLinear)}
    federated_round(server, clients)
    for name, layer in server.named_modules():
        if isinstance(layer, AdaptedLinear):
            A = layer.lora_A.double()
            assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
            U, S, Vh = torch.linalg.svd(averaged[name], full_matrices=False)
            optimum = (U[:, :4] * S[:4]) @ Vh[:4]
            assert float((layer.delta_weight().detach().double() - optimum).norm()) < 1e-5 * float(S[0])
            assert float(S[4]) > 1e-3 * float(S[0])  # the truncation was not trivial


def test_fedsvd_clients_train_only_b_and_the_round_is_exact() -> None:
    server = sk.adapt(gpt2(), "lora", rank=4)
    clients = [federated_client(server) for _ in range(2)]
    for seed, client in enumerate(clients):
        assert all(not m.lora_A.requires_grad for m in client.modules() if isinstance(m, AdaptedLinear))
        optimizer = torch.optim.Adam([p for p in client.parameters() if p.requires_grad], lr=2e-2)
        tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
        for _ in range(2):
            optimizer.zero_grad()
            client(tokens, labels=tokens).loss.backward()
            optimizer.step()
    mean = {n: (dict(clients[0].named_modules())[n].delta_weight() + dict(clients[1].named_modules())[n]
                .delta_weight()).double() / 2 for n, m in server.named_modules() if isinstance(m, AdaptedLinear)}
    saved = [{f"{n}.{k}": v for n, m in c.named_modules() if isinstance(m, AdaptedLinear)
              for k, v in m.trainable().items()} for c in clients]  # as save_adapter writes them
    federated_round(server, saved)
    for name, layer in server.named_modules():
        if isinstance(layer, AdaptedLinear):
            assert torch.allclose(layer.delta_weight().double(), mean[name], atol=1e-6)
    with pytest.raises(SpectrakitError, match="FedSVD needs 'lora' adapters"):
        federated_round(sk.adapt(gpt2(), "svfit", rank=2), clients)


def test_a_bias_changing_adapter_is_refused() -> None:
    clover = sk.adapt(gpt2(), "clover")
    with pytest.raises(SpectrakitError, match="clover also changes the bias of layer transformer.h.0.attn.c_attn"):
        merge_adapters(gpt2(), [clover])


def test_the_issues_spelling_sk_adapt_dot_helpers_resolves() -> None:
    """``sk.adapt`` is the verb; ``sk.adapt.federated_round`` (the spelling of the docs) is FedSVD's
    server step itself, and the verb still adapts."""
    package = importlib.import_module("spectrakit.adapt")  # `import spectrakit.adapt as` gives the function

    assert sk.adapt.federated_round is federated_round and sk.adapt.federated_client is federated_client
    assert sk.adapt.merge_adapters is merge_adapters is sk.merge_adapters
    for name in set(package.__all__) - {"adapt"}:
        assert getattr(sk.adapt, name) is getattr(package, name), name
    server = sk.adapt(gpt2(), "lora", rank=2)
    clients = [sk.adapt.federated_client(server) for _ in range(2)]
    with torch.no_grad():
        for seed, client in enumerate(clients):
            for layer in client.modules():
                if isinstance(layer, AdaptedLinear):
                    layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
    sk.adapt.federated_round(server, clients)
    for layer in server.modules():
        if isinstance(layer, AdaptedLinear):
            A = layer.lora_A.double()
            assert torch.allclose(A @ A.T, torch.eye(2, dtype=torch.float64), atol=1e-6)
