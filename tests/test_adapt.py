"""spectrakit.adapt: every method × every target type on tiny random GPT-2 (Conv1D), Llama
and BERT models — exact at init, exact merge, bitwise save/load, parameter counts."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt import AdaptedLinear, find_targets, read_adapter

transformers = pytest.importorskip("transformers")

RANK = 4
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@functools.cache
def _base(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=32))
    else:
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=100, max_position_embeddings=32))
    return model.eval()


def make_model(kind: str) -> torch.nn.Module:
    return copy.deepcopy(_base(kind))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 100, (2, 16), generator=g) for _ in range(3)]


CASES = {
    "lora": ("lora", {}),
    "rslora": ("lora", {"rslora": True, "alpha": 8}),
    "pissa": ("pissa", {}),
    "milora": ("milora", {}),
    "soma": ("soma", {"freeze_blocks": 1}),
    "svfit": ("svfit", {}),
    "svft-diagonal": ("svft", {"pattern": "diagonal"}),
    "svft-banded": ("svft", {"pattern": "banded", "width": 1}),
    "svft-random": ("svft", {"pattern": "random", "width": 2}),
    "svft-topk": ("svft", {"pattern": "top-k", "width": 1}),
    "sorsa": ("sorsa", {}),
    "salt": ("salt", {}),
    "eva": ("eva", {}),
    "spectral-additive": ("spectral", {"variant": "additive"}),
    "spectral-rotational": ("spectral", {"variant": "rotational"}),
    "hra": ("hra", {}),
    "fourierft": ("fourierft", {"n_frequencies": 50}),
    "asymmetric": ("asymmetric", {"slot": 1}),
    "lorma": ("lorma", {}),
    "qgoft": ("qgoft", {"rank": 1}),
    "qgoft-strict": ("qgoft", {"rank": 1, "quasi": False}),
    "ba-lora": ("ba-lora", {"svd_k": 2}),
    "sst": ("sst", {}),
    "sara": ("sara", {"fraction": 0.1}),
    "soda": ("soda", {}),
    "dota": ("dota", {"cores": 2}),
    "lq-lora": ("lq-lora", {"iterations": 2}),
    "clover": ("clover", {}),
}
#: methods whose adapted model is a quantized approximation of the base, not the base itself
QUANTIZED = {"lq-lora"}
MODELS = ("gpt2", "llama", "bert")


def adapt_case(model: torch.nn.Module, case: str) -> torch.nn.Module:
    method, options = CASES[case]
    options = dict(options)
    rank = options.pop("rank", RANK)
    if method == "eva":
        options["calibration"] = calibration()
    return sk.adapt(model, method, rank=rank, **options)


def per_layer_count(case: str, out_f: int, in_f: int, r: int = RANK) -> int:
    """Trainable parameters of one layer, from each method's published formula."""
    method, options = CASES[case]
    width = options.get("width", 1)
    return {
        "lora": r * (in_f + out_f), "rslora": r * (in_f + out_f), "pissa": r * (in_f + out_f),
        "milora": r * (in_f + out_f), "soma": r * (in_f + out_f), "eva": r * (in_f + out_f),
        "svfit": r,
        "svft-diagonal": r,
        "svft-banded": r * (2 * width + 1) - width * (width + 1),
        "svft-random": r * (1 + width),
        "svft-topk": r * (1 + width),
        "sorsa": r * (in_f + out_f + 1),
        "salt": 2 * r + r * (in_f + out_f),
        "spectral-additive": r * (in_f + out_f),
        "spectral-rotational": r * (r - 1),
        "hra": r * in_f,
        "fourierft": min(50, in_f * out_f),
        "asymmetric": r * out_f,
        "lorma": 2 * r * out_f,
        "qgoft": 2 * (in_f - 1),
        "qgoft-strict": in_f - 1,
        "ba-lora": r * (in_f + out_f),
        "sst": min(in_f, out_f) + r * (in_f + out_f),
        "sara": max(1, round(0.1 * out_f * in_f)),
        "soda": r + _kronecker_count(out_f) + _kronecker_count(in_f),
        "dota": _mpo_count(out_f, in_f, r, options.get("cores", 3)),
        "lq-lora": r * (in_f + out_f),
        "clover": 0,  # per layer role, see clover_layers
    }[case]


def _mpo_count(out_f: int, in_f: int, bond: int, cores: int) -> int:
    """Σ χ_{k−1} o_k i_k χ_k of a TT-SVD with bonds capped by the rank and by each unfolding."""
    from spectrakit.adapt.dota import balanced_factors

    outs, ins = balanced_factors(out_f, cores), balanced_factors(in_f, cores)
    sizes = [o * i for o, i in zip(outs, ins)]
    total, left = 0, 1
    for k, size in enumerate(sizes):
        right = 1
        for later in sizes[k + 1:]:
            right *= later
        chi = 1 if k == cores - 1 else min(bond, left * size, right)
        total += left * size * chi
        left = chi
    return total


def _kronecker_count(d: int) -> int:
    """Free entries of a Cayley rotation Q₁ ⊗ Q₂ of ℝ^d, a the largest divisor of d up to √d."""
    a = max(k for k in range(1, int(d ** 0.5) + 1) if d % k == 0)
    b = d // a
    return a * (a - 1) // 2 + b * (b - 1) // 2


def saved_count(case: str, out_f: int, in_f: int, r: int = RANK) -> int:
    """Scalars in the adapter file: the trainable ones, plus what a method must carry besides."""
    extra = {"sst": min(in_f, out_f) * (in_f + out_f) + r}  # the current bases and the drawn indices
    return per_layer_count(case, out_f, in_f, r) + extra.get(case, 0)


HEAD_DIM = 16  # the tiny models' 32-wide hidden size over 2 heads


def clover_layers(kind: str, names: set[str]) -> dict[str, tuple[int, int]]:
    """CLOVER's layers and, per layer, (trainable λ, saved transform entries): λ on every key
    and value channel (V·O only under Llama's rotary embeddings), a d_h × d_h transform per head slice."""
    d2 = HEAD_DIM * HEAD_DIM
    if kind == "gpt2":  # fused c_attn: q, k, v thirds of 32 channels each, 2 heads apiece
        return {n: ((64, 6 * d2) if n.endswith("c_attn") else (0, 2 * d2)) for n in names if ".attn." in n}
    if kind == "llama":
        return {n: ((32, 2 * d2) if n.endswith("v_proj") else (0, 2 * d2))
                for n in names if n.endswith(("v_proj", "o_proj"))}
    return {n: ((32, 2 * d2) if n.endswith(("key", "value")) else (0, 2 * d2))
            for n in names if ".attention." in n}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def train_a_little(model: torch.nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        out = outputs(model)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        loss = (out - target).square().mean() + 1e-3 * sk.adapter_penalty(model)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", list(CASES))
def test_exact_init_merge_roundtrip_and_count(case: str, kind: str, tmp_path) -> None:
    model = make_model(kind)
    with torch.no_grad():
        reference = outputs(model)
    shapes = {name: _shape(layer) for name, layer in find_targets(model, "all-linear").items()}
    adapt_case(model, case)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert adapted, "no layer was adapted"

    # exact at initialization (a quantized method: exactly its own dequantized decomposition)
    with torch.no_grad():
        if case in QUANTIZED:
            decomposed = outputs(sk.merge(copy.deepcopy(model)))
            assert relative(outputs(model), decomposed) < 1e-5
            assert relative(outputs(model), reference) < 0.25
        else:
            assert relative(outputs(model), reference) < 1e-5

    # trainable parameters: the method's formula, summed over the adapted layers
    if case == "eva":
        ranks = {n: m.rank for n, m in adapted.items()}
        assert sum(ranks.values()) == RANK * len(shapes)
        expected = sum(per_layer_count(case, *shapes[n], r=r) for n, r in ranks.items())
    else:
        expected = sum(per_layer_count(case, *shapes[n]) for n in adapted)
    if case == "soma":  # the first block is left frozen
        assert set(adapted) == {n for n in shapes if ".0." not in n} != set(shapes)
    elif case == "clover":  # attention pairs only
        layout = clover_layers(kind, set(shapes))
        assert set(adapted) == set(layout) and layout
        expected = sum(trainable for trainable, _ in layout.values())
    else:
        assert set(adapted) == set(shapes)
    assert sk.trainable_parameters(model) == expected

    # a few optimizer steps move the output
    train_a_little(model)
    with torch.no_grad():
        tuned = outputs(model)
    assert relative(tuned, reference) > 1e-6

    # save / load into a fresh base model: bitwise
    path = tmp_path / "adapter.safetensors"
    sk.save_adapter(model, path)
    config, tensors = read_adapter(path)
    assert config["method"] == CASES[case][0]
    if case == "eva":
        assert sum(t.numel() for t in tensors.values()) == expected
    elif case == "clover":
        saved = sum(a + b for a, b in clover_layers(kind, set(shapes)).values())
        assert sum(t.numel() for t in tensors.values()) == saved
    else:
        assert sum(t.numel() for t in tensors.values()) == sum(saved_count(case, *shapes[n]) for n in adapted)
    fresh = sk.load_adapter(make_model(kind), path)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(fresh.state_dict().items())):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(outputs(fresh), tuned)

    # merge: exact, original module types, no adapter left
    types = {n: type(m) for n, m in make_model(kind).named_modules()}
    sk.merge(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    with torch.no_grad():
        assert relative(outputs(model), tuned) < 1e-5


def _shape(layer: torch.nn.Module) -> tuple[int, int]:
    w = layer.weight
    return (w.shape[1], w.shape[0]) if type(layer).__name__ == "Conv1D" else tuple(w.shape)


def test_a_reused_layer_gets_one_adapter_at_every_call_site(tmp_path) -> None:
    def build() -> torch.nn.Sequential:
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 16)
        return torch.nn.Sequential(layer, torch.nn.ReLU(), layer)

    model, x = build(), torch.randn(3, 16)
    sk.adapt(model, "lora", rank=2)
    assert isinstance(model[0], AdaptedLinear) and model[0] is model[2]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    layer = model[0]
    expected = layer(torch.relu(layer(x)))
    assert torch.allclose(model(x), expected)
    sk.save_adapter(model, tmp_path / "a.safetensors")
    loaded = sk.load_adapter(build(), tmp_path / "a.safetensors")
    assert loaded[0] is loaded[2] and torch.allclose(loaded(x), expected, atol=1e-6)
    sk.merge(model)
    assert type(model[0]) is torch.nn.Linear and model[0] is model[2]
    assert torch.allclose(model(x), expected, atol=1e-6)
