"""analyze with local workers and under torch.distributed (2 gloo ranks) equals the serial run."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import spectrakit as sk
from spectrakit.analyze.parallel import partition


def checkpoint(path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(40 + 10 * i, 30, generator=g) for i in range(6)}
    tensors["bad.weight"] = torch.zeros(5, 5)
    save_file(tensors, str(path))
    return path


def assert_same(a, b):
    """Same rows; floats equal up to BLAS thread-count rounding."""
    assert [r["name"] for r in a] == [r["name"] for r in b]
    for x, y in zip(a.rows, b.rows):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-5), key
            else:
                assert x[key] == y[key], key


def test_partition_balances_and_covers():
    sizes = [10, 9, 8, 1, 1, 1, 5, 5]
    shares = partition(sizes, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 2


def test_workers_match_serial_for_files_and_modules(tmp_path):
    path = checkpoint(tmp_path / "m.safetensors")
    serial = sk.analyze(str(path), progress=False)
    pooled = sk.analyze(str(path), progress=False, workers=2)
    assert_same(pooled, serial)
    assert pooled["bad.weight"]["status"] == "skipped"
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 10))
    assert_same(sk.analyze(model, progress=False, workers=2), sk.analyze(model, progress=False))


def test_threads_match_serial_and_restore_torch_threads(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from spectrakit.analyze.parallel import default_threads
    from spectrakit.weights import iter_matrices

    tensors = load_file(str(checkpoint(tmp_path / "m.safetensors")))
    tensors["nan.weight"] = torch.full((6, 4), float("nan"))
    before = torch.get_num_threads()
    threaded = sk.analyze(tensors, progress=False, threads=3)
    assert torch.get_num_threads() == before
    assert_same(threaded, sk.analyze(tensors, progress=False, threads=1))
    from spectrakit.analyze import parallel

    monkeypatch.setattr(parallel, "_SMALL_COST", 60 * 30 * 30)  # layers 4 and 5 count as large: run alone first
    assert_same(sk.analyze(tensors, progress=False, threads=2), threaded)
    assert torch.get_num_threads() == before
    assert threaded["bad.weight"]["status"] == threaded["nan.weight"]["status"] == "skipped"
    # files stream one tensor at a time: one thread unless asked
    assert default_threads(list(iter_matrices(str(tmp_path / "m.safetensors")))) == 1
    expected = min(4, torch.get_num_threads()) if torch.get_num_threads() > 1 else 1
    assert default_threads(list(iter_matrices(tensors))) == expected
    torch.set_num_threads(1)  # a caller that limits torch to one thread keeps analyze serial
    try:
        assert default_threads(list(iter_matrices(tensors))) == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(sk.SpectrakitError, match="threads="):
            sk.analyze(tensors, progress=False, threads=bad)


def _rank_main(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        table = sk.analyze(path, progress=False)
        if rank == 0:
            table.to_json(out)
        torch.save({"rows": len(table), "names": [r["name"] for r in table]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_share_the_work(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    path = str(checkpoint(tmp_path / "m.safetensors"))
    out = str(tmp_path / "table.json")
    mp.spawn(_rank_main, args=(2, free_port(), path, out), nprocs=2, join=True)
    import json

    rows = json.loads(open(out).read())["rows"]
    serial = sk.analyze(path, progress=False)
    assert [r["name"] for r in rows] == [r["name"] for r in serial]
    for got, want in zip(rows, serial.rows):
        if want["status"] == "ok":
            assert got["stable_rank"] == pytest.approx(want["stable_rank"], rel=1e-6)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}", weights_only=True)["rows"] == len(serial)
