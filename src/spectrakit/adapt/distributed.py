"""``adapt``'s SVD initialization shared among ``torchrun`` ranks (weight-parallel).

PiSSA, MiLoRA, SVFit, SVFT, SORSA, SALT, SoDA and the spectral adapters start from the
singular triplets of the frozen weight, ``W = U Σ Vᵀ`` (``AdaptedLinear.factors``): a
function of the weight alone, and nearly all of their initialization time. Under a
``torch.distributed`` group the layers are dealt by ``out · in · min(out, in)``
(:func:`spectrakit._distributed.owners`). Every rank builds every adapter, in the order
one process does (so any random draws of a method happen alike); for a layer another
rank owns, ``factors`` answers with a cheap orthonormal stand-in instead of the SVD. Each
owner then sends its layers' adapter tensors (and the residual weight of the methods
that rewrite it, ``W_res = W − s·B A``) to every rank, bit for bit, so every rank holds
the adapters one process would build. Layers whose method never asked for factors
(LoRA, …) are built alike on every rank and nothing is sent.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
>>> sk.trainable_parameters(sk.adapt(model, "pissa", rank=2, distributed=False))
64
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._distributed import agree, distributed_group, exchange, owners

if TYPE_CHECKING:
    from .base import AdaptedLinear


@dataclass
class _FactorRequests:
    """Set while one adapter is built: whether it asked for factors, and whether to stand in."""

    stand_in: bool
    asked: bool = False


_BUILDING: ContextVar[_FactorRequests | None] = ContextVar("spectrakit_adapt_building", default=None)


def stand_in_factors(layer: AdaptedLinear, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What ``AdaptedLinear.factors`` returns instead of an SVD while a rank builds a layer
    another rank owns (``None``: compute them). Notes that the layer asked for factors.

    Args:
        layer: the adapter being built.
        rank: the number of triplets asked for.
    """
    requests = _BUILDING.get()
    if requests is None:
        return None
    requests.asked = True
    if not requests.stand_in:
        return None
    device, dtype = layer.base_layer.weight.device, layer.adapter_dtype
    # orthonormal, unit singular values: keeps every method's arithmetic finite until the owner's tensors arrive
    U = torch.eye(layer.out_features, rank, dtype=dtype, device=device)
    Vh = torch.eye(rank, layer.in_features, dtype=dtype, device=device)
    return U, torch.ones(rank, dtype=dtype, device=device), Vh


@contextmanager
def _building(stand_in: bool) -> Iterator[_FactorRequests]:
    requests = _FactorRequests(stand_in)
    token = _BUILDING.set(requests)
    try:
        yield requests
    finally:
        _BUILDING.reset(token)


def _sent_tensors(module: nn.Module, rewrites_base: bool) -> dict[str, torch.Tensor]:
    """The tensors an adapter's initialization sets: its own parameters and buffers, and the
    base weight for a method that rewrites it."""
    tensors: dict[str, torch.Tensor] = {f"p.{n}": p for n, p in module.named_parameters()
                                        if not n.startswith("base_layer.")}
    tensors.update({f"b.{n}": b for n, b in module.named_buffers() if not n.startswith("base_layer.")})
    if rewrites_base:
        tensors["base.weight"] = module.get_parameter("base_layer.weight")
    return tensors


def build_adapters(build: Callable[[str, dict[str, Any]], nn.Module], layers: Mapping[str, nn.Module],
                   plan: Mapping[str, dict[str, Any]], *, rewrites_base: bool,
                   distributed: bool | None = None) -> dict[str, nn.Module] | None:
    """Every planned adapter, built weight-parallel when a group of ranks is up (see the
    module docstring); ``None`` when there is no group (the caller builds them as usual).

    Args:
        build: ``build(name, kwargs)`` makes the adapter of one layer.
        layers: the target layers by name.
        plan: the per-layer keyword arguments, in the same order on every rank.
        rewrites_base: the method overwrites the frozen weight (its residual is sent too).
        distributed: see :func:`spectrakit._distributed.distributed_group`.
    """
    group = distributed_group(distributed)
    if group is None:
        return None
    rank, world = group
    names = list(plan)
    costs = []
    for name in names:
        rows, cols = layers[name].get_parameter("weight").shape
        costs.append(float(rows * cols * min(rows, cols)))
    deal = owners(costs, world)
    owner_of = {name: deal[i] for i, name in enumerate(names)}

    def work() -> tuple[dict[str, nn.Module], list[str]]:
        built, asked = {}, []
        for name in names:
            with _building(stand_in=owner_of[name] != rank) as requests:
                built[name] = build(name, plan[name])
            if requests.asked:
                asked.append(name)
        return built, asked

    built, asked = agree(work, "adapt")
    # the same code on every rank asks for factors in the same layers; the owners send theirs
    local = {name: _sent_tensors(built[name], rewrites_base) for name in asked if owner_of[name] == rank}
    received = exchange(local, {name: owner_of[name] for name in asked})

    @torch.no_grad()
    def take() -> None:
        for name in asked:
            if owner_of[name] != rank:
                for key, target in _sent_tensors(built[name], rewrites_base).items():
                    target.copy_(received[name][key].to(target.device))

    agree(take, "adapt")
    return built
