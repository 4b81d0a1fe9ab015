"""MoDeGPT's attention pairs: Q·K by CR decomposition (rotary pairs kept whole), V·O by SVD in the
input metric, the narrow attention layer (cache, kernels), budgets and reload, against float64 ground truth."""

from __future__ import annotations

import copy

import pytest
import torch

import spectrakit as sk
from spectrakit.compress.narrow_attention import NarrowAttention
from spectrakit.errors import SpectrakitError

transformers = pytest.importorskip("transformers")


def llama(attn: str = "sdpa") -> torch.nn.Module:
    """Grouped-query attention: 4 query heads over 2 key/value heads of width 8."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, attn_implementation=attn)).eval().double()


def gpt2(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn)).eval().double()


BUILD = {"llama": llama, "gpt2": gpt2}


def token_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (4, 16), generator=g) for _ in range(2)]


def attention_inputs(model: torch.nn.Module, layer: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Every token's input to ``layer`` (the attention input), float64, by a hook."""
    seen = []
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).reshape(-1, 32).detach())

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_width_reproduces_the_model_and_incremental_decoding_matches(arch: str, attn: str) -> None:
    calib = token_batches()
    model, reference = BUILD[arch](attn), BUILD[arch](attn)
    sk.compress(model, method="modegpt", rank=10**6, calibration=calib)
    attention = [m for m in model.modules() if isinstance(m, NarrowAttention)]
    assert len(attention) == 2
    ids = calib[0]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    half = BUILD[arch](attn)
    sk.compress(half, method="modegpt", ratio=0.5, calibration=calib)
    with torch.no_grad():  # the narrow heads through the model's cache, token by token, equal one full pass
        full = half(input_ids=ids).logits
        out = half(input_ids=ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(9, ids.shape[1]):
            out = half(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_pair_budgets_add_up_and_the_model_reloads_and_generates(arch: str, tmp_path) -> None:
    calib = token_batches()
    model = BUILD[arch]()
    report = sk.compress(model, method="modegpt", ratio=0.5, calibration=calib)
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    pairs = {"mlp": ("gate_proj", "up_proj", "down_proj", "c_fc", "mlp.c_proj"), "qk": ("q_proj", "k_proj"),
             "vo": ("v_proj", "o_proj")}
    before = after = 0
    for children in pairs.values():
        rows = [r for n, r in report.layers.items() if n.endswith(children)]
        pair_before, pair_after = sum(r.parameters_before for r in rows), sum(r.parameters_after for r in rows)
        assert rows and pair_after == pair_before // 2  # each pair keeps half of its width exactly here
        before, after = before + pair_before, after + pair_after
    assert (before, after) == (report.target_parameters_before, report.target_parameters_after)
    sk.save_compressed(model, tmp_path / "m", report)
    loaded = sk.load_compressed(tmp_path / "m").double()
    ids = calib[0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    prompt = ids[:1, :4]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False),
                       model.generate(prompt, max_new_tokens=5, do_sample=False))


def test_query_key_keeps_the_rotary_pairs_of_largest_norm_product() -> None:
    calib = token_batches()
    model = llama()
    layer = model.model.layers[0].self_attn
    X = attention_inputs(model, layer, calib)
    q = X @ layer.q_proj.weight.detach().T  # before the rotation, which leaves each pair's norm unchanged
    k = X @ layer.k_proj.weight.detach().T
    q_pairs = q.square().reshape(-1, 2, 2, 2, 4).sum(dim=(0, 3))  # [kv head, query head in group, pair]
    k_pairs = k.square().reshape(-1, 2, 2, 4).sum(dim=(0, 2))  # [kv head, pair]
    score = q_pairs.sum(dim=1).sqrt() * k_pairs.sqrt()
    sk.compress(model, method="modegpt", ratio=0.5, calibration=calib, modules=("qk",))
    new = model.model.layers[0].self_attn
    assert (new.qk_dim, new.vo_dim) == (4, 8)
    for g in range(2):
        pairs = torch.sort(torch.topk(score[g], 2).indices).values
        assert new.rotary_index[g].tolist() == [*pairs.tolist(), *(pairs + 4).tolist()]
        for h in (2 * g, 2 * g + 1):  # the query heads of the group keep the same rows
            rows = (h * 8 + new.rotary_index[g]).tolist()
            assert torch.equal(new.q_proj.weight[h * 4:(h + 1) * 4], layer.q_proj.weight[rows])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_value_output_error_is_the_eckart_young_minimum_on_the_calibration_inputs(arch: str) -> None:
    calib = token_batches()
    model = BUILD[arch]()
    reference = copy.deepcopy(model)
    site = "model.layers.0.self_attn" if arch == "llama" else "transformer.h.0.attn"
    layer = reference.get_submodule(site)
    X = attention_inputs(reference, layer, calib)
    if arch == "llama":
        V, O, v_bias = layer.v_proj.weight.detach(), layer.o_proj.weight.detach(), None
        groups = 2
    else:
        V, O = layer.c_attn.weight.detach().T[64:], layer.c_proj.weight.detach().T
        v_bias, groups = layer.c_attn.bias.detach()[64:], 1
    report = sk.compress(model, method="modegpt", ratio=0.5, calibration=calib, modules=("vo",))
    new = model.get_submodule(site)
    assert (new.qk_dim, new.vo_dim) == (8 if arch == "llama" else 16, 4 if arch == "llama" else 8)
    d, k = (8 if arch == "llama" else 16), new.vo_dim
    dropped_total = 0.0
    for g in range(new.kv_heads):
        heads = range(g * groups, (g + 1) * groups)
        # the group's dense output, every query head's block side by side: X Zᵀ [O_h]ᵀ
        target = torch.cat([X @ V[g * d:(g + 1) * d].T @ O[:, h * d:(h + 1) * d].T for h in heads], dim=1)
        approx = torch.cat([X @ new.v_proj.weight[g * k:(g + 1) * k].T @ new.o_proj.weight[:, h * k:(h + 1) * k].T
                            for h in heads], dim=1).detach()
        dropped = torch.linalg.svdvals(target)[k:].square().sum()
        assert torch.allclose((target - approx).square().sum(), dropped, rtol=1e-8)
        dropped_total += float(dropped)
    rows = [r for n, r in report.layers.items() if n.startswith(site) and n.endswith("v_proj")]
    assert rows[0].truncation_loss == pytest.approx(dropped_total, rel=1e-8)
    if v_bias is not None:  # the value bias went into the output bias, exactly
        assert torch.allclose(new.o_proj.bias, layer.c_proj.bias + O @ v_bias)


def test_unknown_attention_layout_is_one_line() -> None:
    class Block(torch.nn.Module):  # a Llama-style MLP and no attention layer modegpt knows
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
            self.down_proj = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    with pytest.raises(SpectrakitError, match=r"^modegpt: Block has no attention layer of a known layout; supported: "
                                              r"Llama-style .* GPT-2 self-attention .*; or pass modules=\('mlp',\)$"):
        sk.compress(Block(), method="modegpt", ratio=0.5, calibration=[torch.randn(4, 8)])
    report = sk.compress(Block(), method="modegpt", ratio=0.5, calibration=[torch.randn(4, 8)], modules=("mlp",))
    assert report.ranks["down_proj"] == 8
