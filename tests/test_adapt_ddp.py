"""Adapters under DistributedDataParallel: 2 gloo processes on CPU end with identical parameters."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spectrakit as sk

transformers = pytest.importorskip("transformers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, method: str, folder: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same base model on both ranks
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
        sk.adapt(model, method, rank=4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        data = torch.Generator().manual_seed(100 + rank)  # different batches per rank
        for _ in range(4):
            tokens = torch.randint(0, 100, (2, 16), generator=data)
            optimizer.zero_grad()
            ddp(tokens, labels=tokens).loss.backward()
            optimizer.step()
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trained, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["pissa", "svfit"])
def test_ddp_ranks_agree(method: str, tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), method, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and len(a) == 8 * (2 if method == "pissa" else 1)
    torch.manual_seed(0)
    initial = sk.adapt(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)), method, rank=4)
    moved = False
    for name in a:
        assert torch.equal(a[name], b[name]), name
        moved |= not torch.equal(a[name], initial.get_parameter(name))
    assert moved, "training did not change the adapters"
