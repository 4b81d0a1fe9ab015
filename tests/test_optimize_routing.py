"""for_model on tiny Hugging Face models (GPT-2 with Conv1D and tied wte/lm_head, Llama,
BERT) and on plain modules: every parameter routed exactly once, to the right place."""

from __future__ import annotations

import pytest
import torch

from spectrakit.errors import SpectrakitError
from spectrakit.optimize import METHODS, for_model

transformers = pytest.importorskip("transformers")


def gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))


def llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, max_position_embeddings=64))


def bert() -> torch.nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=64))


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def hidden_names(arch: str, model: torch.nn.Module) -> set[str]:
    """The hidden weight matrices, listed independently of spectrakit's walk."""
    conv1d = transformers.pytorch_utils.Conv1D
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, conv1d))}
    return names - {"lm_head.weight", "cls.predictions.decoder.weight"}


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("method", ["muon", "soap", "galore"])
def test_every_parameter_routed_exactly_once(arch: str, method: str) -> None:
    model = BUILDERS[arch]()
    opt = for_model(model, method, **({"rank": 4} if method == "galore" else {}))
    routed = [id(p) for group in opt.param_groups for p in group["params"]]
    assert len(routed) == len(set(routed))
    assert set(routed) == {id(p) for p in model.parameters()}
    spectral = {name for group in opt.param_groups if not group.get("adamw") for name in group["param_names"]}
    assert spectral == hidden_names(arch, model)
    text = opt.describe()
    assert text.startswith(method) and "adamw" in text
    tokens = torch.randint(0, 100, (2, 12))
    model(tokens, labels=tokens).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(moved) >= len(spectral)


def test_gpt2_tied_head_is_routed_once_to_adamw_and_conv1d_is_transposed() -> None:
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = for_model(model, "muon")
    adamw = [g for g in opt.param_groups if g.get("adamw")][0]
    assert "transformer.wte.weight" in adamw["param_names"]
    assert "lm_head.weight" not in {n for g in opt.param_groups for n in g["param_names"]}
    assert "tied: lm_head.weight" in opt.describe()
    transposed = [g for g in opt.param_groups if g.get("transposed")][0]
    assert "transformer.h.0.mlp.c_fc.weight" in transposed["param_names"]


def test_targets_patterns_narrow_the_spectral_share() -> None:
    model = llama()
    opt = for_model(model, "muon", targets=["*.mlp.*"])
    spectral = {n for g in opt.param_groups if not g.get("adamw") for n in g["param_names"]}
    assert spectral and all(".mlp." in n for n in spectral)
    assert "not in targets" in opt.describe()
    with pytest.raises(SpectrakitError, match="matches no hidden weight matrix"):
        for_model(model, "muon", targets=["nothing_like_this"])


def test_plain_module_with_conv_and_head() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 16),
                                torch.nn.Linear(16, 10))
    opt = for_model(model, "muon")
    spectral = {n for g in opt.param_groups if not g.get("adamw") for n in g["param_names"]}
    assert spectral == {"0.weight", "2.weight"}  # 3.weight is the output head
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    opt.step()


def test_bad_method_and_options_are_one_line() -> None:
    with pytest.raises(SpectrakitError, match="is not one of muon, soap"):
        for_model(gpt2(), "lion")
    with pytest.raises(SpectrakitError, match="GaLore rank=64 exceeds"):
        for_model(gpt2(), "galore", rank=64)
    assert set(METHODS) == {"muon", "soap", "shampoo", "galore", "multinorm", "adamw"}


def test_unknown_option_is_one_line() -> None:
    with pytest.raises(SpectrakitError, match="for_model\\('muon'\\).*rank"):
        for_model(gpt2(), "muon", rank=4)
    with pytest.raises(SpectrakitError, match="AdamW has no option 'momentum'"):
        for_model(gpt2(), "adamw", momentum=0.9)
    assert for_model(gpt2(), "adamw", eps=1e-6).param_groups[0]["eps"] == 1e-6


def test_headless_hugging_face_model_keeps_its_last_layer_spectral() -> None:
    model = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=64))
    spectral = {n for g in for_model(model, "muon").param_groups if not g.get("adamw") for n in g["param_names"]}
    assert "pooler.dense.weight" in spectral
