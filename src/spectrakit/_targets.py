"""Choosing the layers a verb acts on (``"all-linear"`` or a list of name patterns), and
putting their replacements in place.

``adapt`` and ``compress`` both take ``targets=``; this is their one resolver, so the
rules and the error messages are the same everywhere, and both swap a layer under every
name it is registered by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, cast

import torch
from torch import nn

from .errors import SpectrakitError
from .linalg._prepare import all_finite
from .weights.record import natural_key

Layer = TypeVar("Layer")


def select_targets(layers: Mapping[str, Layer], targets: str | Iterable[str], *, verb: str,
                   all_linear: Callable[[Mapping[str, Layer]], dict[str, Layer]],
                   matches: Callable[[str, str], bool], on_miss: Callable[[str], NoReturn],
                   check_hit: Callable[[str], None] = lambda name: None) -> dict[str, Layer]:
    """The entries of ``layers`` that ``targets`` selects, in natural name order.

    Args:
        layers: candidate layers by module name.
        targets: ``"all-linear"`` (then ``all_linear(layers)`` decides) or patterns.
        verb: what will be done to them, for the messages (``"adapt"``, ``"compress"``).
        matches: ``matches(name, pattern)``.
        on_miss: raises the error for a pattern that selects nothing.
        check_hit: raises for a layer a pattern selected but that must not be.
    """
    if isinstance(targets, str) and targets == "all-linear":
        selected = all_linear(layers)
        if not selected:
            raise SpectrakitError(f"targets='all-linear': the model has no nn.Linear or Conv1D layer to {verb}")
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets or [])
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise SpectrakitError(f"targets={targets!r} must be 'all-linear' or a list of layer-name patterns")
        selected = {}
        for pattern in patterns:
            hits = {name: layer for name, layer in layers.items() if matches(name, pattern)}
            if not hits:
                on_miss(pattern)
            for name in hits:
                check_hit(name)
            selected.update(hits)
    return dict(sorted(selected.items(), key=lambda item: natural_key(item[0])))


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of an ``nn.Linear`` or ``Conv1D`` (``nn.Module`` types an attribute ``Tensor | Module``).

    Args:
        layer: a linear layer (``nn.Linear`` or transformers' ``Conv1D``).
    """
    return cast(torch.Tensor, layer.weight)


def check_weight(name: str, layer: Any) -> None:
    """Refuse a layer's weight that no verb can work on, before any layer is touched:
    a meta tensor, a non-floating-point (quantized) dtype, or NaN/Inf values."""
    weight = layer.weight
    if weight.is_meta:
        raise SpectrakitError(f"{name}.weight is a meta tensor and holds no data")
    if not weight.dtype.is_floating_point:
        raise SpectrakitError(f"{name}.weight: dtype {weight.dtype} is not floating point; dequantize it first")
    if not all_finite(weight):
        raise SpectrakitError(f"{name}.weight contains NaN or Inf values")


def module_sites(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each submodule, by ``id`` (a reused layer has several)."""
    sites: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        sites.setdefault(id(module), []).append(name)
    return sites


def replace_module(model: nn.Module, names: Sequence[str], new: nn.Module) -> None:
    """Put ``new`` under each of ``names`` (all the names of one layer, from
    :func:`module_sites`, so that a reused layer stays one module)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
