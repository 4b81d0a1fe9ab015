"""SoMA: minor-component adaptation with frozen early blocks and annealed weight decay
(Yun et al., 2025).

Each adapted layer is MiLoRA's (bottom-r triplets of ``W``):

    A = Σ_m^{1/2} V_mᵀ / √s,   B = U_m Σ_m^{1/2} / √s,   W_res = W − s · B A,
    y = x W_resᵀ + b + s · (x Aᵀ) Bᵀ,

plus two training choices from the paper:

* ``freeze_blocks=k`` leaves the first ``k`` transformer blocks (the layers whose name
  holds a block index ``< k``: ``layers.0``, ``h.1`` …) without an adapter, frozen;
* :func:`annealed_weight_decay` gives a weight-decay coefficient that decays from
  ``start`` to ``end`` over training (cosine); :func:`set_weight_decay` applies it.

Trainable parameters per adapted layer: ``r · (in + out)``.

>>> for step in range(100):                                        # doctest: +SKIP
...     set_weight_decay(optimizer, annealed_weight_decay(step, 100, start=0.1))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .base import block_index, register
from .milora import MiLoRALinear


@register
class SoMALinear(MiLoRALinear):
    method = "soma"
    options = ("alpha", "freeze_blocks")

    @classmethod
    def plan(cls, model: nn.Module, layers: dict[str, nn.Module], rank: int,
             options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        frozen = options.get("freeze_blocks", 0)
        if not isinstance(frozen, int) or frozen < 0:
            raise SpectrakitError(f"freeze_blocks={frozen!r} must be an integer ≥ 0")
        kwargs = {k: v for k, v in options.items() if k != "freeze_blocks"}
        kept = {name: {"rank": rank, **kwargs} for name in layers
                if (index := block_index(name)) is None or index >= frozen}
        if not kept:
            raise SpectrakitError(f"freeze_blocks={frozen} leaves no layer to adapt")
        return kept


def annealed_weight_decay(step: int, total_steps: int, start: float, end: float = 0.0) -> float:
    """Cosine-annealed weight decay: ``end + (start − end)·(1 + cos(π·t))/2``, ``t = step/total``.

    >>> annealed_weight_decay(0, 10, start=0.1), annealed_weight_decay(10, 10, start=0.1)
    (0.1, 0.0)
    """
    if total_steps < 1:
        raise SpectrakitError(f"total_steps={total_steps} must be ≥ 1")
    t = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set ``weight_decay`` of every parameter group of ``optimizer`` to ``value``."""
    for group in optimizer.param_groups:
        group["weight_decay"] = value
