"""``compress`` under ``torchrun``: data-parallel calibration, weight-parallel decompositions.

With a ``torch.distributed`` group of ``R`` ranks (``torchrun --nproc-per-node R``, or
``compress(..., distributed=True)``):

1. **Calibration** — rank ``r`` runs batches ``r, r + R, r + 2R, …``. Every statistic
   :func:`~spectrakit.compress.calibration.collect_statistics` keeps is a sum over tokens or
   batches (``XᵀX``, ``W XᵀX Wᵀ``, ``Σ|x|``, the Fisher row sums and Kronecker factors, the
   token count; ASVD's mean is ``Σ|x| / N``, formed after the sums), so

   .. math::  S = \\sum_{b} s_b = \\sum_{r} \\sum_{b \\equiv r \\ (R)} s_b

   is one ``SUM`` reduction of the ranks' partial sums — equal to one process's up to the
   order of the float64 additions. Each layer's sums are reduced to the rank that
   decomposes it (:func:`reduce_statistics`; ``owner_of=None`` all-reduces them instead).
2. **Decompositions** — the layers are dealt by ``out · in · min(out, in)``
   (:func:`spectrakit._distributed.owners`); each rank transforms and decomposes its share
   with the code one process runs; the singular values go to every rank (the rank
   allocation needs all of them), and after the allocation each owner forms its layers'
   factors, which every rank then receives bit for bit. Every rank ends with the same
   compressed model; the CLI's rank 0 writes it.

A failure on any rank (a NaN batch in its share, a layer that cannot be whitened) stops
every rank with one line naming that rank (:func:`spectrakit._distributed.agree`), before
anything is written.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(32, 32))
>>> sk.compress(model, method="svd", rank=4, distributed=False).ranks   # one process, whatever the env
{'0': 4}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .._distributed import agree, exchange, owners
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from .base import Method, Spectrum, Transform
from .calibration import LayerStatistics, collect_statistics

_TENSOR_FIELDS = tuple(f.name for f in fields(LayerStatistics) if f.name != "tokens")


def layer_owners(matrices: Mapping[str, torch.Tensor], world: int) -> dict[str, int]:
    """Each layer's rank: ``out · in · min(out, in)`` dealt by the LPT rule.

    Args:
        matrices: the layers' ``out × in`` weights, in the same order on every rank.
        world: the number of ranks.
    """
    names = list(matrices)
    costs = [float(W.shape[0] * W.shape[1] * min(W.shape[0], W.shape[1])) for W in matrices.values()]
    deal = owners(costs, world)
    return {name: deal[i] for i, name in enumerate(names)}


def calibration_share(calibration: Any, rank: int, world: int) -> tuple[list[Any], list[int]]:
    """``(batches, numbers)``: this rank's batches ``rank, rank + world, …`` of ``calibration``
    and their numbers in the whole set (for error messages). A single tensor or dict is one batch.

    Args:
        calibration: the iterable of batches every rank was given.
        rank: this rank.
        world: the number of ranks.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise SpectrakitError(f"calibration must be an iterable of batches (a list, a DataLoader, …), "
                              f"got {type(calibration).__name__}")
    if isinstance(calibration, Sequence):
        numbers = list(range(rank, len(calibration), world))
        return [calibration[i] for i in numbers], numbers
    batches, numbers = [], []
    for number, batch in enumerate(calibration):  # e.g. a DataLoader: every rank draws it, each keeps its share
        if number % world == rank:
            batches.append(batch)
            numbers.append(number)
    return batches, numbers


def reduce_statistics(local: Mapping[str, LayerStatistics], names: Sequence[str], *,
                      owner_of: Mapping[str, int] | None = None) -> dict[str, LayerStatistics]:
    """The sums of every rank's partial statistics: ``tokens`` on every rank, the tensors
    all-reduced (``owner_of=None``) or reduced to each layer's owner only (the other ranks
    then hold ``None`` there and free their partial sums).

    A rank whose share reached a layer with no batch contributes zeros. Without a group it
    returns ``local``.

    Args:
        local: this rank's statistics per layer (possibly missing layers its share did not reach).
        names: every layer, in the same order on every rank.
        owner_of: each layer's owner rank, or ``None`` for an all-reduce.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(local)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = {name: (stats.tokens, {key: (tuple(value.shape), str(value.dtype), value.device.type)
                                    for key in _TENSOR_FIELDS if (value := getattr(stats, key)) is not None})
              for name, stats in local.items()}
    layouts: list[Any] = [None] * world
    dist.all_gather_object(layouts, layout)
    nccl = dist.get_backend() == "nccl"
    reduced: dict[str, LayerStatistics] = {}
    for name in names:
        seen = [part[name] for part in layouts if name in part]
        if not seen:
            continue
        stats = LayerStatistics(tokens=sum(tokens for tokens, _ in seen))
        mine = local.get(name)
        keys = sorted({key for _, present in seen for key in present})
        for key in keys:
            shape, dtype, _ = next(present[key] for _, present in seen if key in present)
            value = getattr(mine, key) if mine is not None else None
            if value is None:
                value = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
            home = value.device
            wire = value.to(torch.device("cuda", torch.cuda.current_device())) if nccl else value.cpu()
            if owner_of is None:
                dist.all_reduce(wire, op=dist.ReduceOp.SUM)
            else:
                dist.reduce(wire, dst=owner_of[name], op=dist.ReduceOp.SUM)
            keep = owner_of is None or owner_of[name] == rank
            setattr(stats, key, (wire if wire.device == home else wire.to(home)) if keep else None)
            if mine is not None:
                setattr(mine, key, None)  # the partial sum is no longer needed
        reduced[name] = stats
    return reduced


def collect_shared(model: nn.Module, layers: dict[str, nn.Module], calibration: Any, *,
                   owner_of: Mapping[str, int] | None = None, **options: Any) -> dict[str, LayerStatistics]:
    """:func:`~spectrakit.compress.calibration.collect_statistics` on this rank's share of the
    batches (:func:`calibration_share`), then :func:`reduce_statistics` over the ranks.

    Args:
        model: the model (the same on every rank).
        layers: the targeted layers by name.
        calibration: every batch (each rank runs its share).
        owner_of: reduce each layer's sums to this rank only (``None``: to every rank).
        options: the keyword arguments of ``collect_statistics`` (``gram=``, ``fisher=``, …).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()

    def work() -> dict[str, LayerStatistics]:
        batches, numbers = calibration_share(calibration, rank, world)
        if not batches:
            total = len(calibration) if isinstance(calibration, Sized) else None
            if total == 0 or (total is None and rank == 0):
                raise SpectrakitError("calibration yielded no batches")
            return {}
        return collect_statistics(model, layers, batches, numbers=numbers, **options)

    local = agree(work, "calibration")
    return reduce_statistics(local, list(layers), owner_of=owner_of)


# --- the decompositions ----------------------------------------------------------------------

def _spectrum_tensors(spectrum: Spectrum) -> dict[str, torch.Tensor]:
    tensors = {"S": spectrum.S, "precise": torch.tensor(spectrum.precise)}
    for key, value in (("U", spectrum.U), ("Vh", spectrum.Vh), ("left", spectrum.transform.left),
                       ("right", spectrum.transform.right)):
        if value is not None:
            tensors[key] = value
    return tensors


def _spectrum_from(tensors: Mapping[str, torch.Tensor], weight: torch.Tensor) -> Spectrum:
    device = weight.device
    moved = {key: value.to(device) for key, value in tensors.items()}
    one_sided = "U" not in moved or "Vh" not in moved
    return Spectrum(moved["S"], Transform(moved.get("left"), moved.get("right")), U=moved.get("U"),
                    Vh=moved.get("Vh"), weight=weight if one_sided else None, precise=bool(moved["precise"]))


def _merge_method_state(solver: Method, before: dict[str, Any], names: Sequence[str]) -> None:
    """Make ``solver``'s bookkeeping (dicts by layer, counters) that of one process that
    decomposed every layer, so that its :meth:`~Method.warnings` speak of all of them."""
    import torch.distributed as dist

    state = {key: value for key, value in vars(solver).items()
             if isinstance(value, dict) or (isinstance(value, int) and not isinstance(value, bool))}
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    order = {name: i for i, name in enumerate(names)}
    for key, value in state.items():
        if isinstance(value, dict):
            merged: dict[Any, Any] = {}
            for part in parts:
                merged.update(part[key])
            setattr(solver, key, dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order)))))
        else:  # a counter: what every rank added to it
            start = before.get(key, 0)
            setattr(solver, key, start + sum(part[key] - start for part in parts))


def shared_spectra(solver: Method, matrices: Mapping[str, torch.Tensor], statistics: dict[str, Any],
                   owner_of: Mapping[str, int], *, svd_method: str = "auto", full: bool = False,
                   progress: bool = False) -> dict[str, Spectrum]:
    """Each rank decomposes the layers it owns; every rank gets every layer's singular
    values (``full=True``: the whole decomposition, for the sensitivity search).

    A layer decomposed elsewhere comes back as a :class:`Spectrum` with ``S`` alone unless
    ``full``; its factors then come from :func:`shared_factors`. Each layer's statistics are
    let go once it is decomposed, as in one process.

    Args:
        solver: the compression method (its damping notes are merged over the ranks).
        matrices: every layer's ``out × in`` weight, by name.
        statistics: the layers' statistics (only the owners' are needed).
        owner_of: each layer's rank (:func:`layer_owners`).
        svd_method: as for ``compress``.
        full: send the whole decomposition to every rank.
        progress: a progress bar over this rank's layers.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    mine = [name for name in matrices if owner_of[name] == rank]
    before = {key: value for key, value in vars(solver).items() if isinstance(value, int)}

    def work() -> dict[str, Spectrum]:
        bar = progress_bar(mine, total=len(mine), desc=f"compress {solver.name} (rank {rank})", enabled=progress,
                           unit="layer")
        return {name: solver.spectrum(name, matrices[name], statistics.pop(name, None), svd_method=svd_method)
                for name in bar}

    local = agree(work, f"compress {solver.name}")
    _merge_method_state(solver, before, list(matrices))
    sent = {name: (_spectrum_tensors(spectrum) if full else {"S": spectrum.S}) for name, spectrum in local.items()}
    received = exchange(sent, owner_of)
    spectra: dict[str, Spectrum] = {}
    for name, W in matrices.items():
        if name in local:
            spectra[name] = local[name]
        elif full:
            spectra[name] = _spectrum_from(received[name], W)
        else:
            spectra[name] = Spectrum(received[name]["S"].to(W.device), Transform())
    return spectra


def shared_factors(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int], dtypes: Mapping[str, torch.dtype],
                   owner_of: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(up, down)`` of every layer in ``ranks``, each formed by its owner
    (:meth:`Spectrum.factors`) and sent to every rank bit for bit.

    Args:
        spectra: the layers' spectra (full on their owners, see :func:`shared_spectra`).
        ranks: the rank kept for each layer to factorize.
        dtypes: each layer's weight dtype (that of its factors).
        owner_of: each layer's rank.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    mine = [name for name in ranks if owner_of[name] == rank]
    local = agree(lambda: {name: spectra[name].factors(ranks[name], dtype=dtypes[name]) for name in mine},
                  "compress factors")
    received = exchange({name: {"up": up, "down": down} for name, (up, down) in local.items()},
                        {name: owner_of[name] for name in ranks})
    return {name: local[name] if name in local else (received[name]["up"], received[name]["down"]) for name in ranks}
