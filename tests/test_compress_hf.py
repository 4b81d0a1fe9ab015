"""spectrakit.compress on tiny random Hugging Face models (GPT-2 with Conv1D, Llama):
exact parameter counts, full-rank exactness through Conv1D, save/load, generate(), CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import spectrakit as sk
from spectrakit.cli import main
from spectrakit.compress import LowRankLinear, read_config
from spectrakit.errors import SpectrakitError

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 0, vocab: int = 100) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()


def llama(seed: int = 0, vocab: int = 100) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=vocab, max_position_embeddings=64)).eval()


BUILDERS = {"gpt2": gpt2, "llama": llama}


def calibration(vocab: int = 100, batches: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, 24), generator=g) for _ in range(batches)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd", "svd-llm"])
def test_parameter_counts_are_exact(arch: str, method: str) -> None:
    model = BUILDERS[arch]()
    before = sum(p.numel() for p in model.parameters())
    report = sk.compress(model, method=method, ratio=0.4, allocation="global", calibration=calibration())
    assert report.parameters_before == before
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    assert report.parameters_after < before
    linear = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert linear == {n for n, layer in report.layers.items() if layer.replaced}
    for name in linear:
        assert model.get_submodule(name).rank == report.layers[name].rank
    assert "lm_head" not in report.layers  # the output head is left alone by all-linear


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_full_rank_reproduces_logits(arch: str, method: str) -> None:
    model = BUILDERS[arch]()
    x = torch.randint(0, 100, (2, 16))
    dense = model(x).logits.detach()
    # 24×4×3 = 288 tokens: enough for a stable Cholesky of every input (at most 128 features)
    sk.compress(model, method=method, rank=1000, only_if_smaller=False, calibration=calibration(batches=3))
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    out = model(x).logits.detach()
    assert float((out - dense).norm() / dense.norm()) < 1e-5


def test_conv1d_orientation_matches_plain_svd_of_the_out_by_in_weight() -> None:
    model = gpt2()
    W = model.transformer.h[0].mlp.c_fc.weight.detach().T.double()  # Conv1D stores in × out
    sk.compress(model, method="svd", rank=5, targets=["h.0.mlp.c_fc"])
    layer = model.transformer.h[0].mlp.c_fc
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(layer.weight.double(), (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_round_trip_and_generate(arch: str, tmp_path) -> None:
    model = BUILDERS[arch]()
    report = sk.compress(model, method="svd-llm", ratio=0.3, calibration=calibration())
    prompt = torch.tensor([[1, 2, 3, 4]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)
    sk.save_compressed(model, tmp_path / "small", report)
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["compress.json", "config.json",
                                                                       "model.safetensors"]
    meta = read_config(tmp_path / "small")
    assert {n: s["rank"] for n, s in meta["layers"].items()} == {n: l.rank for n, l in report.layers.items()
                                                                  if l.replaced}
    loaded = sk.load_compressed(tmp_path / "small")
    x = torch.randint(0, 100, (2, 12))
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), generated)
    assert sum(p.numel() for p in loaded.parameters()) == report.parameters_after


def test_a_layer_kept_in_float32_keeps_its_dtype_through_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, d_kv=16, num_heads=2, vocab_size=100,
        decoder_start_token_id=0)).eval().to(torch.bfloat16)
    for name, module in model.named_modules():  # what from_pretrained does for T5's _keep_in_fp32_modules
        if name.endswith("DenseReluDense.wo"):
            module.float()
    report = sk.compress(model, method="svd", ratio=0.3, targets=["DenseReluDense"])
    sk.save_compressed(model, tmp_path / "mixed", report)
    loaded = sk.load_compressed(tmp_path / "mixed")
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.up.dtype == torch.float32
    x = torch.randint(0, 100, (2, 12))
    assert torch.equal(loaded(input_ids=x, decoder_input_ids=x).logits, model(input_ids=x, decoder_input_ids=x).logits)
    half = llama().to(torch.bfloat16)  # its rotary frequencies, a buffer outside the state dict, too
    report = sk.compress(half, method="svd", ratio=0.3)
    sk.save_compressed(half, tmp_path / "half", report)
    assert torch.equal(sk.load_compressed(tmp_path / "half")(x).logits, half(x).logits)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SpectrakitError, match="compress.json"):
        sk.load_compressed(tmp_path)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16))
    sk.compress(plain, method="svd", rank=2)
    sk.save_compressed(plain, tmp_path / "plain")
    with pytest.raises(SpectrakitError, match="pass model="):
        sk.load_compressed(tmp_path / "plain")
    rebuilt = sk.load_compressed(tmp_path / "plain", model=torch.nn.Sequential(torch.nn.Linear(16, 16)))
    assert torch.equal(rebuilt[0].up, plain[0].up)
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpectrakitError, match="model.safetensors"):
        sk.load_compressed(tmp_path / "plain", model=torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_tied_output_head_cannot_be_targeted() -> None:
    with pytest.raises(SpectrakitError, match="tied"):
        sk.compress(gpt2(), method="svd", ratio=0.3, targets=["lm_head"])
    with pytest.raises(SpectrakitError, match="not the weight matrix"):
        sk.compress(gpt2(), method="svd", ratio=0.3, targets=["ln_f"])


def test_cli_compresses_a_byte_level_folder(tmp_path, capsys) -> None:
    source = llama(vocab=256)
    source.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    status = main(["compress", str(tmp_path / "src"), "--method", "svd-llm", "--ratio", "0.3", "--calib", "8",
                   "--seq-len", "32", "--out", str(out), "--quiet"])
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    loaded = sk.load_compressed(out)
    assert report["parameters_after"] == sum(p.numel() for p in loaded.parameters())
    assert report["ratio"] >= 0.3
    assert main(["compress", str(tmp_path / "src"), "--ratio", "1.2", "--out", str(out)]) == 2
    assert "--ratio: expected a number in (0, 1), got '1.2'" in capsys.readouterr().err  # refused while parsing
    assert main(["compress", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["compress", str(tmp_path / "src"), "--method", "tucker", "--out", str(out)]) == 2


class _HeadThenLayer(torch.nn.Module):
    """Runs its `late` layer after the output head (no real model does): the head stop must
    then let the forward finish."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.early, self.head, self.late = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.head(self.early(x)))


def test_cli_plain_svd_needs_no_tokenizer_and_an_encoder_decoder_calibrates(tmp_path, capsys) -> None:
    llama(vocab=100).save_pretrained(tmp_path / "no-tokenizer")  # not byte-level, no tokenizer files
    assert main(["compress", str(tmp_path / "no-tokenizer"), "--method", "svd", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    assert main(["compress", str(tmp_path / "no-tokenizer"), "--method", "asvd", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=256, decoder_start_token_id=0)
    ).save_pretrained(tmp_path / "t5")
    assert main(["compress", str(tmp_path / "t5"), "--method", "svd-llm", "--calib", "4", "--seq-len", "16",
                 "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert type(sk.load_compressed(tmp_path / "c")).__name__ == "T5ForConditionalGeneration"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_statistics_pass_stops_at_the_output_head(arch: str) -> None:
    from spectrakit.compress.api import _output_head, find_layers
    from spectrakit.compress.calibration import collect_statistics

    model = BUILDERS[arch]()
    layers, head, batches = find_layers(model), _output_head(model), calibration()
    head_calls = []
    counter = head.register_forward_hook(lambda *args: head_calls.append(1))
    full = collect_statistics(model, layers, batches, gram=True, scale=True)
    assert len(head_calls) == len(batches)
    stopped = collect_statistics(model, layers, batches, gram=True, scale=True, head=head)
    assert len(head_calls) == len(batches) + 1  # the head ran in the first batch only
    for name in layers:
        assert torch.equal(stopped[name].gram, full[name].gram) and stopped[name].tokens == full[name].tokens
        assert torch.equal(stopped[name].abs_sum, full[name].abs_sum)
    with_head = {**layers, "lm_head": head}  # a targeted head is run, of course
    collect_statistics(model, with_head, batches, gram=True, head=head)
    assert len(head_calls) == 2 * len(batches) + 1
    counter.remove()
    odd = _HeadThenLayer()
    x = [torch.randn(5, 8), torch.randn(5, 8)]
    stats = collect_statistics(odd, {"early": odd.early, "late": odd.late}, x, gram=True, head=odd.head)
    hidden = torch.cat([odd.head(odd.early(batch)) for batch in x]).detach().double()
    assert torch.allclose(stats["late"].gram, hidden.T @ hidden, atol=1e-5)


class _StepLM(torch.nn.Module):
    """Calls its output head at every step (a recurrent language model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, logits = torch.zeros(x.shape[0], 8), []
        for step in range(x.shape[1]):
            h = torch.tanh(self.cell(x[:, step] + h))
            logits.append(self.head(h))
        return torch.stack(logits, 1)


def test_head_called_at_every_step_is_not_a_stop() -> None:
    from spectrakit.compress.api import _output_head
    from spectrakit.compress.calibration import collect_statistics

    model = _StepLM()
    batches = [torch.randn(3, 6, 8) for _ in range(3)]
    layers = {"cell": model.cell}
    full = collect_statistics(model, layers, batches, gram=True)["cell"]
    watched = collect_statistics(model, layers, batches, gram=True, head=_output_head(model))["cell"]
    assert watched.tokens == full.tokens == 3 * 3 * 6 and torch.equal(watched.gram, full.gram)


def test_encoder_decoder_calibrates_from_dict_batches_and_refuses_bare_ids() -> None:
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100, decoder_start_token_id=0,
        pad_token_id=0)).eval()
    ids = calibration()
    with pytest.raises(SpectrakitError,
                       match="encoder-decoder T5ForConditionalGeneration: pass calibration batches as dicts"):
        sk.compress(model, method="svd-llm", ratio=0.3, calibration=ids)
    for method in ("asvd", "fwsvd", "svd-llm"):
        compressed = sk.compress(copy.deepcopy(model), method=method, ratio=0.3,
                                 calibration=[{"input_ids": x, "labels": x} for x in ids])
        assert compressed.parameters_after < compressed.parameters_before


def test_an_error_inside_the_model_is_one_line_naming_the_batch() -> None:
    model = gpt2()
    bad = [torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 64))]  # longer than n_positions = 32
    for method in ("svd-llm", "fwsvd"):
        with pytest.raises(SpectrakitError, match=r"^calibration batch 1: ") as caught:
            sk.compress(model, method=method, ratio=0.3, calibration=bad)
        assert "\n" not in str(caught.value)


def test_padding_is_left_out_of_the_statistics() -> None:
    """Right-padded dict batches give the statistics of their real tokens alone."""
    from spectrakit.compress.api import find_layers
    from spectrakit.compress.calibration import collect_statistics

    model = llama()
    layers = find_layers(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 16), generator=g)
    lengths = [16, 9, 5]
    mask = (torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]).long()
    padded = [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}]
    real = [ids[i:i + 1, :n] for i, n in enumerate(lengths)]
    wide = {"model.layers.0.self_attn.k_proj": layers["model.layers.0.self_attn.k_proj"].weight}  # 16 × 32
    a = collect_statistics(model, layers, padded, gram=True, scale=True, output_gram=wide)
    b = collect_statistics(model, layers, real, gram=True, scale=True, output_gram=wide)
    for name in layers:
        assert a[name].tokens == b[name].tokens == sum(lengths)
        for key in ("gram", "output_gram", "abs_sum"):
            x, y = getattr(a[name], key), getattr(b[name], key)
            assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, rtol=1e-4, atol=1e-6)), key


def test_fwsvd_default_loss_skips_padding_and_refuses_a_masked_lm() -> None:
    from spectrakit.compress.calibration import default_loss

    model = llama()
    ids = torch.randint(1, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask[:, 1:].reshape(-1) == 1
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100)[keep], ids[:, 1:].reshape(-1)[keep])
    got = default_loss(model, {"input_ids": ids, "attention_mask": mask})
    assert torch.allclose(got, expected, rtol=1e-6)
    left = torch.ones_like(ids)
    left[0, :3] = 0  # left padding: no target is predicted from a padded position either
    logits = model(input_ids=ids, attention_mask=left).logits
    keep = ((left[:, 1:] == 1) & (left[:, :-1] == 1)).reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100)[keep], ids[:, 1:].reshape(-1)[keep])
    assert torch.allclose(default_loss(model, {"input_ids": ids, "attention_mask": left}), expected, rtol=1e-6)
    from spectrakit.compress.api import find_layers
    from spectrakit.compress.calibration import collect_statistics

    stats = collect_statistics(model, find_layers(model), [{"input_ids": ids, "attention_mask": left}], fisher=True)
    assert {s.tokens for s in stats.values()} == {int(left.sum())}
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randint(0, 100, (8, 12))), batch_size=4)  # batches are [ids]
    assert sk.compress(llama(), method="fwsvd", ratio=0.3, calibration=loader).parameters_after > 0
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)).eval()
    with pytest.raises(SpectrakitError, match="BertForMaskedLM does not predict the next token"):
        sk.compress(bert, method="fwsvd", ratio=0.3, calibration=calibration())
