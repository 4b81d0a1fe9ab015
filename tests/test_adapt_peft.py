"""Export to PEFT: a folder that peft.PeftModel.from_pretrained loads with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt import export_peft
from spectrakit.errors import SpectrakitError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def base(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)).eval()


CASES = {
    "lora": ("lora", {"alpha": 8}),
    "rslora": ("lora", {"alpha": 8, "rslora": True}),
    "pissa": ("pissa", {}),
    "milora": ("milora", {}),
    "soma": ("soma", {"freeze_blocks": 1}),
    "eva": ("eva", {}),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_round_trip(case: str, kind: str, tmp_path) -> None:
    method, options = CASES[case]
    original = base(kind)
    model = copy.deepcopy(original)
    if method == "eva":
        g = torch.Generator().manual_seed(2)
        options = {"calibration": [torch.randint(0, 100, (2, 16), generator=g) for _ in range(3)]}
    sk.adapt(model, method, rank=4, **options)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(TOKENS).logits
        assert float((expected - original(TOKENS).logits).norm()) > 1e-4  # the adapter did something

    folder = export_peft(model, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(folder)).eval()
    with torch.no_grad():
        got = loaded(TOKENS).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    if method in ("pissa", "milora", "soma"):  # converted to a plain LoRA of rank 2r on the original weight
        assert config["r"] == 8
    if method == "eva":
        ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
        assert sum(ranks.values()) == 4 * len(ranks)


def test_methods_without_a_peft_equivalent_refuse(tmp_path) -> None:
    model = sk.adapt(base("llama"), "svfit", rank=4)
    with pytest.raises(SpectrakitError, match="method 'svfit' has no PEFT equivalent"):
        export_peft(model, tmp_path / "x")


def _peft_twin(kind: str, method: str, targets: list[str]) -> torch.nn.Module:
    """PEFT's own implementation on the same base, randomly initialized so the check is not trivial."""
    if method == "fourierft":
        config = peft.FourierFTConfig(n_frequency=50, scaling=150.0, random_loc_seed=5, init_weights=False,
                                      target_modules=targets, fan_in_fan_out=kind == "gpt2")
    else:
        config = peft.HRAConfig(r=4, target_modules=targets, init_weights=False)
    return peft.get_peft_model(base(kind), config).eval()


@pytest.mark.parametrize(("kind", "method"), [("gpt2", "fourierft"), ("llama", "fourierft"), ("llama", "hra")])
def test_fourierft_and_hra_match_peft_and_export_to_its_format(kind: str, method: str, tmp_path) -> None:
    from spectrakit.adapt import find_targets

    targets = sorted(find_targets(base(kind), "all-linear"))
    twin = _peft_twin(kind, method, targets)
    options = {"n_frequencies": 50, "seed": 5} if method == "fourierft" else {}
    model = sk.adapt(base(kind), method, rank=4, **options)
    with torch.no_grad():  # the same init: PEFT's tensors copied into ours
        for name in targets:
            peft_layer = twin.base_model.model.get_submodule(name)
            ours = model.get_submodule(name)
            if method == "fourierft":
                ours.coefficients.copy_(peft_layer.fourierft_spectrum["default"])
            else:
                ours.reflections.copy_(peft_layer.hra_u["default"].T)
        expected, got = twin(TOKENS).logits, model(TOKENS).logits
        assert float((got - base(kind)(TOKENS).logits).norm()) > 1e-3  # not the identity
    assert float((got - expected).norm() / expected.norm()) < 1e-5

    folder = export_peft(model, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == {"fourierft": "FOURIERFT", "hra": "HRA"}[method]
    loaded = peft.PeftModel.from_pretrained(base(kind), str(folder)).eval()
    with torch.no_grad():
        again = loaded(TOKENS).logits
    assert float((again - got).norm() / got.norm()) < 1e-5


def test_hra_export_refuses_conv1d(tmp_path) -> None:
    model = sk.adapt(base("gpt2"), "hra", rank=2)
    with pytest.raises(SpectrakitError, match="PEFT's HRA wraps nn.Linear only; layer transformer.h.0.attn.c_attn"):
        export_peft(model, tmp_path / "x")
