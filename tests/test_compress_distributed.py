"""compress and adapt under torchrun: 2 real gloo ranks on the CPU, started by torch.distributed.run.

One launch runs tests/distributed_ranks.py, which on every rank compares each distributed
call with the same call under ``distributed=False`` in the same process (calibration
statistics, compress for svd / svd-llm / asvd / gfwsvd / the sensitivity search, PiSSA,
MiLoRA, SVFT, SORSA and LoRA initialization), runs the ``compress`` and ``finetune``
commands, and injects two failures seen only by rank 1. This file checks what the ranks
wrote against one process here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spectrakit as sk
from spectrakit._distributed import decompose_shared, distributed_group, owners, partition
from spectrakit.compress.distributed import calibration_share

pytest.importorskip("transformers")
RANKS = Path(__file__).with_name("distributed_ranks.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(RANKS), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    return out


def test_ranks_end_alike_and_match_one_process(launched: Path) -> None:
    first, second = (json.loads((launched / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first == second  # same digests of every compressed model and adapter, same messages
    assert first["statistics_relative_error"] < 1e-12  # checked per tensor on each rank, against one process
    assert first["tokens"] == 5 * 2 * 17  # 5 batches of 2 × 17 tokens, all counted once
    for key, value in first.items():
        if key.startswith("compress svd "):
            assert value["max_relative_difference"] == 0.0, key  # bitwise: no calibration involved


def test_rank_failure_stops_every_rank_with_one_line(launched: Path) -> None:
    failures = json.loads((launched / "rank0.json").read_text())["failures"]
    assert failures == json.loads((launched / "rank1.json").read_text())["failures"]
    assert failures["nan batch"] == "rank 1: calibration: calibration batch 1 contains NaN or Inf values"
    line = failures["corrupt file"]
    assert line.startswith("rank 1: svdvals: ") and "layer2.safetensors" in line and "\n" not in line
    assert not (launched / "never-written").exists()


def test_cli_compress_and_finetune_under_torchrun_equal_one_process(launched: Path, tmp_path: Path) -> None:
    from spectrakit.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank
    try:
        assert main(["compress", "--method", "svd", "--ratio", "0.3", "--out", str(tmp_path / "svd"), "--quiet"]) == 0
        assert main(["finetune", "--method", "pissa", "--rank", "4", "--steps", "1", "--batch-size", "2",
                     "--seq-len", "16", "--eval-windows", "2", "--out", str(tmp_path / "pissa"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    for folder, name in (("svd", "model.safetensors"), ("pissa", "adapter.safetensors")):
        want, got = load_file(str(tmp_path / folder / name)), load_file(str(launched / f"cli-{folder}" / name))
        assert want.keys() == got.keys() and want, folder
        for key in want:
            assert torch.equal(want[key], got[key]), (folder, key)
    report = json.loads((launched / "cli-svd" / "report.json").read_text())
    assert report["ratio"] == pytest.approx(json.loads((tmp_path / "svd" / "report.json").read_text())["ratio"])


def test_shares_and_one_process_fallbacks() -> None:
    batches = [torch.full((1, 2), i) for i in range(5)]
    shares = [calibration_share(batches, r, 2) for r in (0, 1)]
    assert [numbers for _, numbers in shares] == [[0, 2, 4], [1, 3]]
    assert all(b is batches[n] for mine, numbers in shares for b, n in zip(mine, numbers))
    mine, numbers = calibration_share(iter(batches), 1, 2)  # a plain iterator: every rank draws it, keeps its share
    assert numbers == [1, 3] and [int(b[0, 0]) for b in mine] == [1, 3]
    assert partition([5, 1, 4, 3], 2) == [[0, 1], [2, 3]] and owners([5, 1, 4, 3], 2) == [0, 0, 1, 1]
    assert distributed_group(None) is None and distributed_group(False) is None
    with pytest.raises(sk.SpectrakitError, match="distributed=True needs"):
        distributed_group(True)
    with pytest.raises(sk.SpectrakitError, match="distributed=True needs"):
        sk.compress(torch.nn.Sequential(torch.nn.Linear(8, 8)), "svd", rank=2, distributed=True)
    with pytest.raises(sk.SpectrakitError, match="distributed=True needs"):
        sk.adapt(torch.nn.Sequential(torch.nn.Linear(8, 8)), "pissa", rank=2, distributed=True)
    W = torch.randn(6, 4, dtype=torch.float64)
    (got,) = decompose_shared(["w"], [1.0], lambda _: torch.linalg.svdvals(W)).values()
    assert torch.equal(got, torch.linalg.svdvals(W))
