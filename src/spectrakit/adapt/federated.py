"""FedSVD: federated LoRA whose server re-factorizes the averaged update by SVD (seed 000).

Clients start from the global LoRA adapter, keep ``A`` frozen and train only ``B``
(:func:`federated_client`). The server averages the clients' products and refactors:

    P = Σ_k w_k B_k A_k,   P ≈ U_r Σ_r V_rᵀ   (best rank r, ``spectrakit.linalg.svd``),
    A ← V_rᵀ  (orthonormal rows),   B ← U_r Σ_r,

so that ``s B A`` is the Eckart–Young optimum of the averaged update at the adapter's rank
and the next round's frozen ``A`` spans its principal input directions. When every client
kept the global ``A``, ``P = s (Σ w_k B_k) A`` has rank ≤ r and the refactoring is exact.

>>> server = sk.adapt(model, "lora", rank=8)                                       # doctest: +SKIP
>>> for _ in range(rounds):                                                        # doctest: +SKIP
...     clients = [federated_client(server) for _ in shards]   # train each on its own shard
...     federated_round(server, clients)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import adapted_layers


def _lora_layers(model: nn.Module, what: str) -> dict[str, Any]:
    layers: dict[str, Any] = adapted_layers(model)
    if not layers:
        raise SpectrakitError(f"{what}: the model has no spectrakit adapters")
    wrong = sorted({layer.method for layer in layers.values()} - {"lora"})
    if wrong:
        raise SpectrakitError(f"{what}: FedSVD needs 'lora' adapters (A and B both saved), got {wrong[0]!r}")
    return layers


def federated_client(global_adapter: nn.Module) -> nn.Module:
    """A client's copy of the global model: the same adapters, with every ``lora_A`` frozen.

    Args:
        global_adapter: the server's model, adapted with ``"lora"``.
    """
    client = copy.deepcopy(global_adapter)
    for layer in _lora_layers(client, "federated_client").values():
        layer.lora_A.requires_grad_(False)
    return client


def _factors(client: nn.Module | Mapping[str, torch.Tensor], name: str, index: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(client, nn.Module):
        layer: Any = adapted_layers(client).get(name)
        if layer is None or layer.method != "lora":
            raise SpectrakitError(f"client {index}: no 'lora' adapter at layer {name}")
        return layer.lora_A.detach(), layer.lora_B.detach()
    try:
        return client[f"{name}.lora_A"], client[f"{name}.lora_B"]
    except KeyError as error:
        raise SpectrakitError(f"client {index}: missing tensor {error.args[0]}") from None


@torch.no_grad()
def federated_round(global_adapter: nn.Module, client_adapters: Sequence[nn.Module | Mapping[str, torch.Tensor]],
                    weights: Sequence[float] | None = None) -> nn.Module:
    """One FedSVD aggregation: the global ``A, B`` become the SVD refactoring of the clients'
    weighted mean ``B_k A_k``, in place.

    Args:
        global_adapter: the server's model, adapted with ``"lora"``.
        client_adapters: the clients' models (from :func:`federated_client`, trained) or their
            adapter tensors (``{"<layer>.lora_A": …, "<layer>.lora_B": …}``, as saved).
        weights: one weight per client (e.g. its number of examples); normalized to sum to 1.
            Default: the plain mean.

    Returns:
        ``global_adapter``, whose every ``lora_A`` now has orthonormal rows.
    """
    layers = _lora_layers(global_adapter, "federated_round")
    if not client_adapters:
        raise SpectrakitError("federated_round: no client adapters given")
    if weights is None:
        w = [1.0 / len(client_adapters)] * len(client_adapters)
    else:
        if len(weights) != len(client_adapters) or sum(weights) <= 0:
            raise SpectrakitError(f"weights: {len(weights)} entries with a positive sum needed for "
                                  f"{len(client_adapters)} clients")
        w = [float(x) / float(sum(weights)) for x in weights]
    for name, layer in layers.items():
        product = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64,
                              device=layer.lora_A.device)
        for index, (client, weight) in enumerate(zip(client_adapters, w)):
            A, B = _factors(client, name, index)
            if A.shape != layer.lora_A.shape or B.shape != layer.lora_B.shape:
                raise SpectrakitError(f"client {index}: layer {name} has factors {tuple(B.shape)}·{tuple(A.shape)}, "
                                      f"the global adapter {tuple(layer.lora_B.shape)}·{tuple(layer.lora_A.shape)}")
            product += weight * (B.to(product) @ A.to(product))
        A_new, B_new = _orthonormal_split(product, layer.rank)
        layer.lora_A.copy_(A_new)
        layer.lora_B.copy_(B_new)
    return global_adapter


def _orthonormal_split(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = V_rᵀ`` (orthonormal rows, even for zero singular values) and ``B = U_r Σ_r``."""
    U, S, Vh = linalg.svd(product, k=rank, method="exact", dtype=torch.float64)
    return Vh, U * S
