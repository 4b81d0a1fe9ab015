"""Work shared among the ranks of a ``torch.distributed`` group (e.g. under ``torchrun``).

What ``analyze``, ``compress``, ``adapt`` and the matrix optimizers share:

* :func:`partition` / :func:`owners` — items dealt by size, largest first, each to the
  least-loaded share (the LPT rule, ties to the lower rank), so shares take about the same
  time; the deal depends on the sizes alone, so every rank computes the same one;
* :func:`distributed_group` — whether a call runs distributed, joining the group under
  ``torchrun`` when it is not up yet; :func:`torchrun_group` does the same for a CLI
  command (and leaves the group when the process exits);
* :func:`agree` — a step every rank runs, after which all ranks fail together, each with
  the same one line naming the first rank that failed and its error, or all go on;
* :func:`exchange` / :func:`decompose_shared` — each rank computes the items it owns, then
  every rank receives every item, bit for bit (tensors travel as bytes).

With ``owner = owners(sizes, world)[i]`` item ``i`` is computed once, by the same code one
process runs, so the gathered results are those of one process with the same intra-op
thread count.

>>> partition([5, 1, 4, 3], 2)
[[0, 1], [2, 3]]
>>> decompose_shared(["a", "b"], [1, 2], lambda name: {"x": torch.ones(2)}, distributed=False)["b"]["x"]
tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .errors import SpectrakitError

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]

# bytes sent per broadcast at most (a larger tensor goes alone): bounds the staging buffer
_CHUNK_BYTES = 256 * 2**20


def owners(sizes: Sequence[float], parts: int) -> list[int]:
    """The share (rank) of each item: largest first, each to the least-loaded share, ties
    to the lower share and the lower index, so every rank computes the same deal.

    Args:
        sizes: each item's cost (e.g. ``rows · cols · min(rows, cols)`` for an SVD).
        parts: the number of shares (the world size).
    """
    loads = [0.0] * parts
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(parts), key=lambda r: (loads[r], r))
        owner[index] = target
        loads[target] += sizes[index]
    return owner


def partition(sizes: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` dealt into ``parts`` shares of about equal total (the LPT rule
    of :func:`owners`), each share in index order.

    Args:
        sizes: each item's cost.
        parts: the number of shares.
    """
    shares: list[list[int]] = [[] for _ in range(parts)]
    for index, owner in enumerate(owners(sizes, parts)):
        shares[owner].append(index)
    return shares


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ and "RANK" in os.environ


def join_torchrun() -> int:
    """Under torchrun (``WORLD_SIZE > 1``) join the process group if it is not up yet
    (backend ``$SPECTRAKIT_BACKEND``, default gloo); returns this rank (0 otherwise)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            return 0
        dist.init_process_group(backend=os.environ.get("SPECTRAKIT_BACKEND", "gloo"))
    return dist.get_rank()


@contextlib.contextmanager
def torchrun_group() -> Iterator[int]:
    """A CLI command's ``with`` block: joins the group under torchrun (see
    :func:`join_torchrun`) and yields this rank. A group it joined is left when the process
    exits (not at the end of the block: a group cannot be joined twice under one torchrun
    launch, and a script may run several commands)."""
    import atexit

    import torch.distributed as dist

    joined = dist.is_available() and not dist.is_initialized() and _launched_by_torchrun()
    rank = join_torchrun()
    if joined:
        atexit.register(_leave)
    yield rank


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_group(distributed: bool | None) -> tuple[int, int] | None:
    """``(rank, world_size)`` when the work is to be shared among ranks, else ``None``.

    Args:
        distributed: ``None``: share it when a group of more than one rank is up, or when
            launched by torchrun with ``WORLD_SIZE > 1`` (the group is then joined);
            ``True``: the same, and an error when there is no group to share with;
            ``False``: one process, whatever the environment.
    """
    import torch.distributed as dist

    if distributed is False or not dist.is_available():
        if distributed:
            raise SpectrakitError("distributed=True: torch.distributed is not available in this torch build")
        return None
    if not dist.is_initialized() and _launched_by_torchrun():
        join_torchrun()
    active = dist.is_initialized() and dist.get_world_size() > 1
    if not active:
        if distributed:
            raise SpectrakitError("distributed=True needs an initialized torch.distributed group of more than one "
                                  "rank (e.g. run under torchrun --nproc-per-node 2)")
        return None
    return dist.get_rank(), dist.get_world_size()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(error, SpectrakitError):
        return first or type(error).__name__
    return f"{type(error).__name__}{': ' + first if first else ''}"


def agree(work: Callable[[], T], what: str = "") -> T:
    """Run ``work()`` on every rank, then fail on every rank if it failed on any.

    Each rank reports whether its ``work`` raised; if one did, every rank raises the same
    :class:`SpectrakitError` naming the first rank that failed and its error
    (``rank 1: calibration batch 3 contains NaN or Inf values``), so no rank waits forever
    in a later collective and none writes output. Without a group it is ``work()``.

    Args:
        work: this rank's part of the step.
        what: the step, for the message (e.g. ``"compress"``).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return work()
    failure: BaseException | None = None
    result: Any = None
    try:
        result = work()
    except Exception as error:  # reported to every rank below, then raised everywhere
        failure = error
    statuses: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, None if failure is None else _one_line(failure))
    for rank, message in enumerate(statuses):
        if message is not None:
            where = f"{what}: " if what else ""
            stop = SpectrakitError(f"rank {rank}: {where}{message}")
            if failure is not None:
                raise stop from failure
            raise stop
    return result


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."))
    assert isinstance(value, torch.dtype)
    return value


def exchange(local: Mapping[str, Mapping[str, torch.Tensor]], owner_of: Mapping[str, int]) -> dict[str, Tensors]:
    """Every item's tensors on every rank: each rank passes the items it owns (``local``)
    and receives the others', bit for bit.

    Tensors travel as their bytes in the owner's dtype and shape (one all-gather of shapes,
    then one broadcast per chunk of at most 256 MiB per owner); received ones land on the
    communication device (the CPU for gloo, this rank's GPU for nccl), the local ones stay
    as they were. Without a group it returns ``local``.

    Args:
        local: item name → {key → tensor}, for the items this rank owns.
        owner_of: every item's owner rank (the same mapping on every rank).
    """
    import torch.distributed as dist

    results: dict[str, Tensors] = {name: dict(tensors) for name, tensors in local.items()}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return results
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = [(name, key, tuple(t.shape), str(t.dtype), t.numel() * t.element_size())
              for name, tensors in local.items() for key, t in tensors.items()]
    layouts: list[Any] = [None] * world
    dist.all_gather_object(layouts, layout)
    device = _comm_device()
    for source in range(world):
        entries = layouts[source]
        for chunk in _chunks(entries):
            total = sum(entry[4] for entry in chunk)
            if total == 0:
                if source != rank:
                    for name, key, shape, dtype, _ in chunk:
                        results.setdefault(name, {})[key] = torch.empty(shape, dtype=_dtype(dtype), device=device)
                continue
            if source == rank:
                buffer = torch.cat([local[name][key].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                                    for name, key, *_ in chunk])
            else:
                buffer = torch.empty(total, dtype=torch.uint8, device=device)
            dist.broadcast(buffer, src=source)
            if source == rank:
                continue
            offset = 0
            for name, key, shape, dtype, size in chunk:
                piece = buffer[offset:offset + size].clone()  # aligned storage of its own
                results.setdefault(name, {})[key] = piece.view(_dtype(dtype)).reshape(shape)
                offset += size
    missing = [name for name in owner_of if name not in results]
    if missing:
        raise SpectrakitError(f"rank {owner_of[missing[0]]} sent no result for {missing[0]}")
    return results


def _chunks(entries: Sequence[tuple[str, str, tuple[int, ...], str, int]]
            ) -> Iterator[list[tuple[str, str, tuple[int, ...], str, int]]]:
    chunk: list[tuple[str, str, tuple[int, ...], str, int]] = []
    size = 0
    for entry in entries:
        if chunk and size + entry[4] > _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry[4]
    if chunk:
        yield chunk


def _as_tensors(value: Any, name: str) -> Tensors:
    """A result as named tensors; the keys say its structure (``=`` a tensor, ``#i`` a tuple, ``.key`` a dict)."""
    if isinstance(value, torch.Tensor):
        return {"=": value}
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return {f"#{i}": v for i, v in enumerate(value)}
    if isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {f".{key}": v for key, v in value.items()}
    raise TypeError(f"decompose_shared: the result for {name} is not a tensor, a tuple of tensors or a dict of them")


def _from_tensors(tensors: Tensors) -> Any:
    if "=" in tensors:
        return tensors["="]
    if any(key.startswith("#") for key in tensors):
        return tuple(tensors[f"#{i}"] for i in range(len(tensors)))
    return {key[1:]: value for key, value in tensors.items()}


def decompose_shared(names: Sequence[str], sizes: Sequence[float], fn: Callable[[str], T], *,
                     distributed: bool | None = None, what: str = "") -> dict[str, T]:
    """``{name: fn(name) for name in names}``, each computed by one rank and then sent to all.

    The weight-parallel step of ``compress`` and of ``adapt``'s SVD initialization, and what a
    block-by-block loop calls for the matrices of one block: the names are dealt by
    :func:`owners` on ``sizes``; each rank runs ``fn`` on its own share (under
    :func:`agree`, so one rank's failure stops every rank with one line); the results —
    a tensor, a tuple of tensors or a dict of them — are then exchanged bit for bit (a
    rank's own results are returned as computed, the others' on the communication device,
    see :func:`exchange`).

    Args:
        names: the items (e.g. layer names), in the same order on every rank.
        sizes: each item's cost, for the deal.
        fn: the computation of one item.
        distributed: see :func:`distributed_group` (``False``: ``fn`` on every name here).
        what: the step's name in an error message.
    """
    group = distributed_group(distributed)
    if group is None:
        return {name: fn(name) for name in names}
    rank, world = group
    deal = owners(sizes, world)
    owner_of = {name: deal[i] for i, name in enumerate(names)}
    mine = [name for name in names if owner_of[name] == rank]

    def work() -> tuple[dict[str, T], dict[str, Tensors]]:
        results = {name: fn(name) for name in mine}
        return results, {name: _as_tensors(value, name) for name, value in results.items()}

    computed, packed = agree(work, what)
    received = exchange(packed, owner_of)
    return {name: computed[name] if name in computed else _from_tensors(received[name]) for name in names}
