"""Checkpoints larger than memory: compress(folder, low_memory=True), sequential=True, init_from_checkpoint.

Ground truths: the in-memory ``compress`` (plain svd does not depend on the order of the
blocks), SVD-LLM's sequential definition written out as one in-memory ``compress`` per
block on the model whose earlier blocks are already compressed, and the in-memory
``adapt`` (PiSSA, MiLoRA, SoRSA, LoRA). Peak memory is measured in a child process.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

import spectrakit as sk  # noqa: E402
from spectrakit.adapt import read_adapter  # noqa: E402
from spectrakit.cli import main  # noqa: E402
from spectrakit.errors import SpectrakitError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(layers: int = 3) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2(layers: int = 3) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A sharded tiny Llama (untied head) and GPT-2 (Conv1D, head tied to the embeddings)."""
    torch.manual_seed(0)
    made = {}
    for kind, build, shard in (("llama", _llama, "60KB"), ("gpt2", _gpt2, "40KB")):
        model = build()
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder, max_shard_size=shard)
        assert len(list(folder.glob("*.safetensors"))) > 2  # really sharded
        made[kind] = (folder, model)
    return made


def _batches(vocab: int, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, 16), generator=generator) for _ in range(count)]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_low_memory_svd_equals_in_memory_and_generates(folders, kind, tmp_path):
    folder, model = folders[kind]
    report = sk.compress(folder, "svd", ratio=0.3, out=tmp_path / "out", low_memory=True)
    loaded = sk.load_compressed(tmp_path / "out")  # built on the meta device, its tensors assigned from the shards
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    reference = copy.deepcopy(model)
    expected = sk.compress(reference, "svd", ratio=0.3)
    _same_weights(loaded, reference)
    assert report.ranks == expected.ranks and report.parameters_after == expected.parameters_after
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 3  # a shard per block and more
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, reference(prompt).logits, rtol=0, atol=0)
    generated = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    if kind == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie survives


def _sequential_by_hand(model: torch.nn.Module, method: str, prefix: str, count: int, batches) -> None:
    """SVD-LLM's sequential definition with the ordinary in-memory compress: block i is
    calibrated by a whole-model pass through the already compressed blocks 0 … i−1."""
    for index in range(count):
        sk.compress(model, method, ratio=0.3, calibration=batches, targets=[f"{prefix}.{index}.*"])


@pytest.mark.filterwarnings("ignore::spectrakit.compress.CompressionWarning")
@pytest.mark.parametrize("kind,method", [("llama", "svd-llm"), ("gpt2", "svd-llm"), ("llama", "asvd")])
def test_low_memory_equals_sequential_definition(folders, kind, method, tmp_path):
    folder, model = folders[kind]
    prefix = "model.layers" if kind == "llama" else "transformer.h"
    batches = _batches(model.config.vocab_size)
    by_hand = copy.deepcopy(model)
    _sequential_by_hand(by_hand, method, prefix, 3, batches)
    sequential = copy.deepcopy(model)
    report = sk.compress(sequential, method, ratio=0.3, calibration=batches, sequential=True)
    _same_weights(sequential, by_hand, atol=1e-5)
    sk.compress(folder, method, ratio=0.3, calibration=batches, out=tmp_path / "out", low_memory=True)
    loaded = sk.load_compressed(tmp_path / "out")
    _same_weights(loaded, sequential, atol=1e-6)
    assert report.calibration_tokens == sum(b.numel() for b in batches)
    # and the sequential result is not the one-pass one (the later blocks saw compressed inputs)
    one_pass = copy.deepcopy(model)
    sk.compress(one_pass, method, ratio=0.3, calibration=batches)
    last = f"{prefix}.2.mlp." + ("down_proj" if kind == "llama" else "c_proj") + ".up"
    assert not torch.allclose(one_pass.state_dict()[last], sequential.state_dict()[last], atol=1e-4)


@pytest.mark.filterwarnings("ignore::spectrakit.compress.CompressionWarning")
def test_padding_left_out_block_by_block_as_in_a_whole_model_pass(folders):
    _, model = folders["llama"]
    ids = _batches(256, 2)
    mask = torch.ones_like(ids[0])
    mask[:2, 10:] = 0  # right padding in two rows
    batches = [{"input_ids": ids[0], "attention_mask": mask}, {"input_ids": ids[1]}]
    by_hand, sequential = copy.deepcopy(model), copy.deepcopy(model)
    _sequential_by_hand(by_hand, "svd-llm", "model.layers", 3, batches)
    report = sk.compress(sequential, "svd-llm", ratio=0.3, calibration=batches, sequential=True)
    _same_weights(sequential, by_hand, atol=1e-5)
    assert report.calibration_tokens == ids[0].numel() + ids[1].numel() - 12


def test_low_memory_refusals(folders, tmp_path):
    folder, model = folders["llama"]
    cases = [
        (dict(out=None, low_memory=True), "pass out=DIR"),
        (dict(out=tmp_path / "a"), "pass low_memory=True"),
        (dict(out=tmp_path / "a", low_memory=True, allocation="global"), "allocation='global' needs every layer"),
        (dict(out=tmp_path / "a", low_memory=True, targets=["lm_head"]), "lm_head is outside them"),
    ]
    for options, message in cases:
        with pytest.raises(SpectrakitError, match=message):
            sk.compress(folder, "svd", ratio=0.3, **options)
    with pytest.raises(SpectrakitError, match="not 'fwsvd'"):
        sk.compress(folder, "fwsvd", ratio=0.3, calibration=_batches(256), out=tmp_path / "a", low_memory=True)
    with pytest.raises(SpectrakitError, match="no config.json"):
        sk.compress(tmp_path, "svd", ratio=0.3, out=tmp_path / "a", low_memory=True)
    with pytest.raises(SpectrakitError, match="takes a checkpoint folder"):
        sk.compress(copy.deepcopy(model), "svd", ratio=0.3, low_memory=True, out=tmp_path / "a")
    with pytest.raises(SpectrakitError, match="needs calibration"):
        sk.compress(folder, "svd-llm", ratio=0.3, out=tmp_path / "a", low_memory=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SpectrakitError, match="not empty and was not written by spectrakit"):
        sk.compress(folder, "svd", ratio=0.3, out=foreign, low_memory=True)
    assert not (tmp_path / "a").exists()


def test_a_failure_midway_leaves_no_output(folders, tmp_path, monkeypatch):
    import importlib

    folder, _ = folders["llama"]
    low_memory = importlib.import_module("spectrakit.compress.low_memory")
    calls = {"n": 0}
    real = low_memory.run_block

    def failing(block, inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, after a block's shard was written
        real(block, inputs)

    monkeypatch.setattr(low_memory, "run_block", failing)
    with pytest.raises(KeyboardInterrupt):
        sk.compress(folder, "svd-llm", rank=8, calibration=_batches(256), out=tmp_path / "out", low_memory=True)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_cli_low_memory(folders, tmp_path, capsys):
    folder, model = folders["llama"]
    assert main(["compress", str(folder), "--low-memory", "--method", "svd", "--rank", "8", "--out",
                 str(tmp_path / "cli"), "--quiet"]) == 0
    reference = copy.deepcopy(model)
    sk.compress(reference, "svd", rank=8)
    _same_weights(sk.load_compressed(tmp_path / "cli"), reference)
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["budget"]["rank"] == 8
    assert main(["compress", str(folder), "--low-memory", "--allocation", "global", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "allocates ranks uniformly" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["pissa", "milora", "sorsa", "lora"])
def test_init_from_checkpoint_equals_in_memory_adapt(folders, kind, method, tmp_path):
    folder, model = folders[kind]
    torch.manual_seed(3)
    out = sk.adapt_checkpoint(folder, method, rank=4, out=tmp_path / "adapter")
    residual = type(model).from_pretrained(out).eval()
    sk.load_adapter(residual, out / "adapter.safetensors")
    torch.manual_seed(3)  # lora draws its A from the RNG, layer by layer in the same order
    reference = sk.adapt(copy.deepcopy(model), method, rank=4)
    _same_weights(residual, reference)
    ids = _batches(model.config.vocab_size, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(residual(ids).logits, reference(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(residual(ids).logits, model(ids).logits, rtol=0, atol=1e-4)  # exact at init
    config, _ = read_adapter(out / "adapter.safetensors")
    assert config["method"] == method
    assert all(layer.get("residual") is (True if method != "lora" else None) for layer in config["layers"].values())


def test_init_from_checkpoint_refusals_and_cli(folders, tmp_path, capsys):
    folder, model = folders["gpt2"]
    with pytest.raises(SpectrakitError, match="plans over the whole model"):
        sk.adapt_checkpoint(folder, "eva", rank=4, out=tmp_path / "a")
    with pytest.raises(SpectrakitError, match="tied to"):
        sk.adapt_checkpoint(folder, "pissa", rank=4, out=tmp_path / "a", targets=["lm_head"])
    with pytest.raises(SpectrakitError, match="no option"):
        sk.adapt_checkpoint(folder, "pissa", rank=4, out=tmp_path / "a", pattern="banded")
    assert not (tmp_path / "a").exists()
    assert main(["adapter-init", str(folder), "--method", "pissa", "--rank", "4", "--out", str(tmp_path / "cli"),
                 "--quiet"]) == 0
    residual = type(model).from_pretrained(tmp_path / "cli").eval()
    sk.load_adapter(residual, tmp_path / "cli" / "adapter.safetensors")
    _same_weights(residual, sk.adapt(copy.deepcopy(model), "pissa", rank=4))


PEAK = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import spectrakit as sk
    from spectrakit.weights.checkpoint import Checkpoint
    folder, out, method = sys.argv[1:4]
    Checkpoint(folder).skeleton()  # imports the model's transformers modules before the baseline
    sk.compress(torch.nn.Sequential(torch.nn.Linear(64, 64)), "svd", rank=8)  # and loads the LAPACK code
    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak (VmHWM) starts again from here
    base = status("VmRSS")
    if method == "pissa":
        sk.adapt_checkpoint(folder, "pissa", rank=8, out=out)
    else:
        batches = [torch.randint(0, 256, (2, 32)) for _ in range(2)]
        sk.compress(folder, method, ratio=0.3, calibration=batches, out=out, low_memory=True)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_one_block_not_the_model(tmp_path):
    """Eight blocks of 24 MB (float32, 1024 wide, 192 MB in all). Low-memory svd holds one
    block plus the SVD's work on one layer (its float64 copy, Gram matrix, eigensolver
    workspace and vectors: about five float64 copies of the layer); PiSSA's init holds one
    block of residuals. Both stay far below the model."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(config)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    whole = sum(p.numel() * 4 for p in model.parameters())
    layer_float64 = 1024 * 1024 * 8  # the largest layer in float64
    model.save_pretrained(tmp_path / "model", max_shard_size="30MB")
    del model
    bounds = {"svd": 1.5 * block + 5 * layer_float64 + 32 * 2**20, "pissa": 1.5 * block + 32 * 2**20}
    for method, bound in bounds.items():
        run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "model"), str(tmp_path / method), method],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        above = figures["peak"] - figures["base"]
        assert above < bound, (method, above / 2**20, block / 2**20)
        assert above < 0.55 * whole, (method, above / 2**20, whole / 2**20)
