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
