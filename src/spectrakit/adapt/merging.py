"""Several saved adapters of one base model combined into one update per layer.

Each adapter ``i`` gives a task vector per layer, ``τᵢ = W'ᵢ − W`` (its merged weight
minus the original weight, whatever the method: additive, residual or multiplicative).
The combination rules, with weights ``wᵢ``:

* ``linear``:           ``ΔW = Σ wᵢ τᵢ``, weights normalized to sum to 1 (default: the mean);
* ``task-arithmetic``:  ``ΔW = Σ wᵢ τᵢ`` as given (default ``wᵢ = 1``; Ilharco et al., 2023);
* ``ties``:             trim each ``wᵢτᵢ`` to its ``density`` largest magnitudes, elect the sign of
  ``Σ trimᵢ`` per entry, average the entries that agree with it (Yadav et al., 2023);
* ``dare``:             drop entries with probability ``1 − density``, rescale the rest by
  ``1/density``, then ``Σ wᵢ τᵢ`` (Yu et al., 2024);
* ``svd``:              ``Σ wᵢ τᵢ`` refactored to rank ``rank`` — the Eckart–Young optimum.

With ``rank=None`` the combined update is written into the base weights (a plain model,
exact). With ``rank=r`` every layer instead gets a LoRA adapter holding the best rank-``r``
approximation of its combined update, ``B A = U_r Σ_r V_rᵀ`` from ``spectrakit.linalg.svd``,
which saves and exports like any LoRA. ``method="svd"`` needs ``rank``.

Adapters trained with the ``asymmetric`` method, one ``seed`` and distinct ``slot``\\ s
(orthogonal adaptation) sum with no interference term: their row spaces are orthogonal.

>>> merged = sk.adapt.merge_adapters(base, ["code.safetensors", "docs.safetensors"],
...                                  method="svd", rank=8)                          # doctest: +SKIP
>>> sk.save_adapter(merged, "both.safetensors")                                     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .api import adapt, adapter_config, read_adapter
from .base import adapted_layers, fingerprint, get_method, is_conv1d

COMBINATIONS = ("linear", "task-arithmetic", "ties", "dare", "svd")
_DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}
AdapterSource = str | os.PathLike | nn.Module | tuple[dict[str, Any], dict[str, torch.Tensor]]


def _resolve(source: AdapterSource, index: int) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(label, config, tensors)`` of a path, an adapted model or a ``read_adapter`` pair."""
    if isinstance(source, (str, os.PathLike)):
        config, tensors = read_adapter(source)
        return str(source), config, tensors
    if isinstance(source, nn.Module):
        tensors = {f"{name}.{key}": value.detach() for name, layer in adapted_layers(source).items()
                   for key, value in layer.trainable().items()}
        return f"adapter {index} (model)", adapter_config(source), tensors
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], dict):
        return f"adapter {index}", source[0], source[1]
    raise SpectrakitError(f"adapter {index}: expected a file path, an adapted model or a (config, tensors) pair, "
                          f"got {type(source).__name__}")


@torch.no_grad()
def task_vector(layer: Any, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                label: str) -> torch.Tensor:
    """``W' − W`` (``out × in``, float32 or the base's float64) of one saved adapter's layer.

    Args:
        layer: the plain base layer (``nn.Linear`` or ``Conv1D``); it is copied, never changed.
        name: the layer's name in the model and in the adapter.
        config: the adapter's config (``read_adapter``'s first value).
        tensors: the adapter's tensors.
        label: how error messages name the adapter.
    """
    if fingerprint(layer.weight) != config["fingerprints"][name]:
        raise SpectrakitError(f"{label}: base weight of layer {name} differs from the model's "
                              "(adapters of different bases cannot be merged)")
    cls = get_method(config["method"])
    if cls.method == "clover" and getattr(layer, "bias", None) is not None:
        raise SpectrakitError(f"{label}: clover also changes the bias of layer {name}, which a weight update "
                              "cannot carry; merge that adapter with spectrakit.merge instead")
    adapter: Any = cls(copy.deepcopy(layer), name=name, **config["layers"][name])
    for key, target in adapter.trainable().items():
        value = tensors.get(f"{name}.{key}")
        if value is None:
            raise SpectrakitError(f"{label}: missing tensor {name}.{key}")
        if value.shape != target.shape:
            raise SpectrakitError(f"{label}: tensor {name}.{key} has shape {tuple(value.shape)}, "
                                  f"layer {name} expects {tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
    original = layer.weight.T if adapter.fan_in_fan_out else layer.weight
    return adapter.merged_weight() - original.to(adapter.adapter_dtype)


def _trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """``update`` with all but its ``⌈density·n⌉`` largest magnitudes set to zero."""
    keep = max(1, int(round(density * update.numel())))
    if keep >= update.numel():
        return update
    threshold = update.abs().reshape(-1).kthvalue(update.numel() - keep + 1).values
    return torch.where(update.abs() >= threshold, update, torch.zeros_like(update))


def combine_updates(updates: Sequence[torch.Tensor], method: str = "linear", weights: Sequence[float] | None = None,
                    density: float | None = None, seed: int = 0) -> torch.Tensor:
    """One layer's combined update from its task vectors (see the module docstring for the rules).

    Args:
        updates: the task vectors ``τᵢ``, all of one shape.
        method: ``"linear"``, ``"task-arithmetic"``, ``"ties"``, ``"dare"`` or ``"svd"`` (the sum; the
            refactoring to a rank happens in :func:`merge_adapters`).
        weights: one weight per update (defaults: ``1/n`` for linear, ``1`` otherwise).
        density: kept fraction for ``ties`` (default 0.2) and ``dare`` (default 0.5).
        seed: ``dare``'s random drop mask.

    >>> a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 4.0]])
    >>> combine_updates([a, b], "linear")
    tensor([[2., 1.]])
    """
    if method not in COMBINATIONS:
        raise SpectrakitError(f"method={method!r} must be one of {', '.join(COMBINATIONS)}")
    if not updates:
        raise SpectrakitError("merge_adapters: no adapters given")
    w = _weights(method, weights, len(updates))
    density = _density(method, density)
    if method == "ties":
        trimmed = torch.stack([wi * _trim(u, density) for wi, u in zip(w, updates)])
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    if method == "dare":
        generator = torch.Generator().manual_seed(seed)
        total = torch.zeros_like(updates[0])
        for wi, u in zip(w, updates):
            keep = (torch.rand(u.shape, generator=generator) < density).to(device=u.device, dtype=u.dtype)
            total = total + wi * u * keep / density
        return total
    total = torch.zeros_like(updates[0])
    for wi, u in zip(w, updates):
        total = total + wi * u
    return total


def _weights(method: str, weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n if method == "linear" else [1.0] * n
    values = [float(x) for x in weights]
    if len(values) != n:
        raise SpectrakitError(f"weights has {len(values)} entries for {n} adapters")
    if method == "linear":
        total = sum(values)
        if total == 0:
            raise SpectrakitError("weights sum to 0; method='linear' normalizes them to sum to 1")
        values = [x / total for x in values]
    return values


def _density(method: str, density: float | None) -> float:
    value = _DEFAULT_DENSITY.get(method, 1.0) if density is None else float(density)
    if not 0.0 < value <= 1.0:
        raise SpectrakitError(f"density={density!r} must be in (0, 1]")
    return value


def merge_adapters(model: nn.Module, adapters: Sequence[AdapterSource], method: str = "linear",
                   weights: Sequence[float] | None = None, rank: int | None = None,
                   density: float | None = None, seed: int = 0) -> nn.Module:
    """Combine several adapters of ``model``'s base into one update per layer, in place.

    Args:
        model: the plain base model every adapter was trained on (no adapters in it).
        adapters: files from :func:`spectrakit.save_adapter`, adapted models, or
            ``(config, tensors)`` pairs from :func:`spectrakit.adapt.read_adapter`; methods may differ.
        method: ``"linear"``, ``"task-arithmetic"``, ``"ties"``, ``"dare"`` or ``"svd"``.
        weights: one weight per adapter (see :func:`combine_updates`).
        rank: ``None`` writes the combined update into the base weights; an integer gives each
            layer a LoRA adapter with the combined update's best rank-``rank`` approximation.
        density: kept fraction for ``ties`` / ``dare``.
        seed: ``dare``'s drop mask.

    Returns:
        ``model``. A layer that only some adapters change gets zero from the others.
    """
    if method not in COMBINATIONS:
        raise SpectrakitError(f"method={method!r} must be one of {', '.join(COMBINATIONS)}")
    if method == "svd" and rank is None:
        raise SpectrakitError("method='svd' needs rank= (the rank of the refactored update)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise SpectrakitError(f"rank={rank!r} must be a positive integer")
    if adapted_layers(model):
        raise SpectrakitError("merge_adapters: the model already has adapters; pass the plain base model")
    sources = [_resolve(source, i) for i, source in enumerate(adapters)]
    if not sources:
        raise SpectrakitError("merge_adapters: no adapters given")
    _weights(method, weights, len(sources))
    _density(method, density)
    modules = dict(model.named_modules())
    names = sorted({name for _, config, _ in sources for name in config["layers"]})
    for name in names:
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "weight"):
            label = next(label for label, config, _ in sources if name in config["layers"])
            raise SpectrakitError(f"{label}: the model has no layer {name}")
        if rank is not None:
            out_f, in_f = _out_in(layer)
            if rank >= min(out_f, in_f):
                raise SpectrakitError(f"rank={rank} must be below {min(out_f, in_f)} for layer {name} ({out_f}×{in_f})")

    combined: dict[str, torch.Tensor] = {}
    for position, name in enumerate(names):
        layer = modules[name]
        updates, kept = [], []
        for i, (label, config, tensors) in enumerate(sources):
            if name in config["layers"]:
                updates.append(task_vector(layer, name, config, tensors, label))
                kept.append(i)
        if len(kept) < len(sources):  # an adapter that leaves this layer alone contributes zero
            zero = torch.zeros_like(updates[0])
            updates = [updates[kept.index(i)] if i in kept else zero for i in range(len(sources))]
        combined[name] = combine_updates(updates, method, weights, density, seed + position)

    if rank is None:
        with torch.no_grad():
            for name, update in combined.items():
                weight: Any = modules[name].weight
                delta = update.T if is_conv1d(modules[name]) else update
                weight.copy_((weight.to(update.dtype) + delta).to(weight.dtype))
        return model
    adapt(model, "lora", rank=rank, targets=names, alpha=float(rank))
    with torch.no_grad():
        lora: dict[str, Any] = adapted_layers(model)
        for name, layer in lora.items():
            A, B = best_rank_factors(combined[name], rank)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
    return model


def best_rank_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r × in), B (out × r)`` with ``B A`` the best rank-``r`` approximation of ``update``
    (exact SVD from the spectral core, computed in float64, √Σ split between the factors).

    Args:
        update: an ``out × in`` matrix.
        rank: the number of singular triplets kept.
    """
    U, S, Vh = linalg.svd(update, k=rank, method="exact", dtype=torch.float64)
    root = S.sqrt()
    return (root[:, None] * Vh).to(update.dtype), (U * root).to(update.dtype)


def _out_in(layer: Any) -> tuple[int, int]:
    shape = layer.weight.shape
    return (int(shape[1]), int(shape[0])) if is_conv1d(layer) else (int(shape[0]), int(shape[1]))
