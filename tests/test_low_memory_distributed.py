"""The low-memory paths under torchrun: 2 real gloo ranks on the CPU, started by torch.distributed.run.

``compress(folder, low_memory=True)`` and ``init_from_checkpoint(folder, …)`` share their
decompositions among the ranks (and svd-llm its calibration batches); rank 0 writes the
folder. The ground truth is the same call in one process (``distributed=False``) here:
bitwise for svd, PiSSA and LoRA (no sums are reordered), to float64 rounding for svd-llm
(its Gram sums are added in another order). A failure injected on rank 1 must stop both
ranks with the same one line and leave no output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
import transformers  # noqa: E402

import spectrakit as sk  # noqa: E402

RANK_SCRIPT = textwrap.dedent('''
    import importlib, json, os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import spectrakit as sk
    from spectrakit.cli import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out, folder = Path(sys.argv[1]), sys.argv[2]
    batches = torch.load(Path(folder) / "batches.pt", weights_only=True)
    sk.compress(folder, "svd", ratio=0.3, out=out / "svd", low_memory=True)
    report = sk.compress(folder, "svd-llm", ratio=0.3, calibration=batches, out=out / "svd-llm", low_memory=True)
    # one batch for two ranks: rank 1 has none of its own, yet takes part in every block's collectives
    sk.compress(folder, "svd-llm", ratio=0.3, calibration=batches[:1], out=out / "svd-llm-one", low_memory=True)
    sk.adapt.init_from_checkpoint(folder, "pissa", rank=4, out=out / "pissa")
    torch.manual_seed(5)  # lora's random A: every rank draws alike, rank 0 writes its own
    sk.adapt.init_from_checkpoint(folder, "lora", rank=4, out=out / "lora")
    assert main(["compress", folder, "--low-memory", "--method", "svd", "--rank", "4", "--out",
                 str(out / "cli-svd"), "--quiet"]) == 0
    failures = {}

    def broken(*args, **kwargs):
        raise sk.SpectrakitError("injected failure")

    for what, module, attribute, call in (
            ("compress", importlib.import_module("spectrakit.compress.blockwise"), "decompose",
             lambda: sk.compress(folder, "svd", rank=4, out=out / "never-compress", low_memory=True)),
            ("pissa", importlib.import_module("spectrakit.adapt.base"), "singular_factors",
             lambda: sk.adapt.init_from_checkpoint(folder, "pissa", rank=4, out=out / "never-pissa"))):
        original = getattr(module, attribute)
        if rank == 1:
            setattr(module, attribute, broken)
        try:
            call()
        except sk.SpectrakitError as error:
            failures[what] = str(error)
        finally:
            setattr(module, attribute, original)
    (out / f"rank{rank}.json").write_text(json.dumps({"tokens": report.calibration_tokens, "ranks": report.ranks,
                                                      "failures": failures}))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a gloo thread joinable at exit could abort the rank
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded tiny Llama and what two torchrun ranks wrote from it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 2  # really sharded
    generator = torch.Generator().manual_seed(1)
    torch.save([torch.randint(0, 256, (2, 16), generator=generator) for _ in range(5)], folder / "batches.pt")
    out = tmp_path_factory.mktemp("ranks")
    script = out / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(out), str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    return folder, out


def _one_process(call):  # noqa: ANN001, ANN202 - a test helper
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank
    try:
        return call()
    finally:
        torch.set_num_threads(threads)


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _compare(want: Path, got: Path, *, rtol: float = 0.0) -> None:
    expected, actual = _shards(want), _shards(got)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        if rtol == 0.0:
            assert torch.equal(expected[key], actual[key]), key
        else:
            torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=rtol * expected[key].abs().max(),
                                       msg=key)


def test_low_memory_compress_under_torchrun_equals_one_process(launched, tmp_path):
    folder, out = launched
    _one_process(lambda: sk.compress(folder, "svd", ratio=0.3, out=tmp_path / "svd", low_memory=True,
                                     distributed=False))
    _compare(tmp_path / "svd", out / "svd")  # bitwise: the owners' factors travel as bytes
    batches = torch.load(folder / "batches.pt", weights_only=True)
    report = _one_process(lambda: sk.compress(folder, "svd-llm", ratio=0.3, calibration=batches,
                                              out=tmp_path / "svd-llm", low_memory=True, distributed=False))
    _compare(tmp_path / "svd-llm", out / "svd-llm", rtol=1e-4)  # the Gram sums are added in another order
    _one_process(lambda: sk.compress(folder, "svd-llm", ratio=0.3, calibration=batches[:1],
                                     out=tmp_path / "svd-llm-one", low_memory=True, distributed=False))
    _compare(tmp_path / "svd-llm-one", out / "svd-llm-one", rtol=1e-4)  # fewer batches than ranks
    first, second = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["tokens"] == second["tokens"] == report.calibration_tokens == 5 * 2 * 16  # every batch once
    assert first["ranks"] == second["ranks"] == report.ranks
    assert sk.load_compressed(out / "svd-llm") is not None
    assert json.loads((out / "svd" / "compress.json").read_text())["report"]["layers"] == json.loads(
        (tmp_path / "svd" / "compress.json").read_text())["report"]["layers"]  # every rank's reports, merged
    _one_process(lambda: sk.compress(folder, "svd", rank=4, out=tmp_path / "cli-svd", low_memory=True))
    _compare(tmp_path / "cli-svd", out / "cli-svd")  # the CLI joined the group; rank 0 wrote it
    assert (out / "cli-svd" / "report.json").is_file()


def test_init_from_checkpoint_under_torchrun_equals_one_process(launched, tmp_path):
    folder, out = launched
    _one_process(lambda: sk.adapt.init_from_checkpoint(folder, "pissa", rank=4, out=tmp_path / "pissa",
                                                       distributed=False))
    torch.manual_seed(5)
    _one_process(lambda: sk.adapt.init_from_checkpoint(folder, "lora", rank=4, out=tmp_path / "lora",
                                                       distributed=False))
    for method in ("pissa", "lora"):
        _compare(tmp_path / method, out / method)  # residual shards
        want = load_file(str(tmp_path / method / "adapter.safetensors"))
        got = load_file(str(out / method / "adapter.safetensors"))
        assert want.keys() == got.keys() and want
        assert all(torch.equal(want[key], got[key]) for key in want), method
        config, _ = sk.adapt.read_adapter(out / method / "adapter.safetensors")
        assert config == sk.adapt.read_adapter(tmp_path / method / "adapter.safetensors")[0]  # layers, fingerprints


def test_a_rank_that_fails_stops_both_and_writes_nothing(launched):
    _, out = launched
    first, second = (json.loads((out / f"rank{r}.json").read_text())["failures"] for r in (0, 1))
    assert first == second
    assert first["compress"] == "rank 1: compress svd: injected failure"
    assert first["pissa"] == "rank 1: init pissa: injected failure"
    assert not list(out.glob("never-*")) and not list(out.glob(".never-*"))
