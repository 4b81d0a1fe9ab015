"""Muon, SOAP and Shampoo under DistributedDataParallel (2 gloo processes on CPU): the
per-matrix work is split over the ranks and all-gathered, and the parameters equal those
of one process — bitwise against the same optimizer run undistributed on the same
gradients, and to rounding against one process that sees the whole batch (Muon,
Shampoo; SOAP's eigenbasis of a rank-deficient factor is not continuous in the
gradient, so DDP's rounding-level change of the averaged gradient can rotate its null
space: for SOAP the bitwise comparison is the test)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spectrakit.optimize import for_model
from spectrakit.optimize._distributed import balance

transformers = pytest.importorskip("transformers")

METHODS = ("muon", "soap", "shampoo")
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))  # no dropout: the two runs must see the same function


def _batches(rank: int) -> list[torch.Tensor]:
    data = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 100, (2, 16), generator=data) for _ in range(STEPS)]


def _options(method: str) -> dict:
    return {"precondition_frequency": 1} if method != "muon" else {}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for method in METHODS:
            model, twin = _model(), _model()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            spread_opt = for_model(model, method, **_options(method))
            local_opt = for_model(twin, method, distributed=False, **_options(method))
            for tokens in _batches(rank):
                spread_opt.zero_grad()
                ddp(tokens, labels=tokens).loss.backward()
                for p, q in zip(model.parameters(), twin.parameters()):
                    q.grad = p.grad.clone()  # the all-reduced gradient
                spread_opt.step()
                local_opt.step()
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                assert torch.equal(p, q), f"{method}: {name} differs from the undistributed optimizer"
            results[method] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for method in ("muon", "shampoo"):  # SOAP: see below
        model = _model()
        opt = for_model(model, method, **_options(method))
        for first, second in zip(_batches(0), _batches(1)):  # one process, the whole batch
            opt.zero_grad()
            tokens = torch.cat([first, second])
            model(tokens, labels=tokens).loss.backward()
            opt.step()
        for name, p in model.named_parameters():
            assert torch.allclose(a[method][name], p, atol=2e-5), (method, name)
    initial = _model()
    for method in METHODS:  # the ranks agree bitwise and have trained
        for name in a[method]:
            assert torch.equal(a[method][name], b[method][name]), (method, name)
        assert not torch.equal(a[method]["transformer.h.0.attn.c_attn.weight"],
                               initial.get_parameter("transformer.h.0.attn.c_attn.weight"))


def test_balance_is_size_ordered_and_even() -> None:
    owners = balance([9.0, 1.0, 8.0, 2.0, 5.0, 5.0], 2)
    loads = [sum(c for c, o in zip([9.0, 1.0, 8.0, 2.0, 5.0, 5.0], owners) if o == r) for r in range(2)]
    assert loads == [15.0, 15.0]
    assert balance([3.0, 3.0], 1) == [0, 0]
