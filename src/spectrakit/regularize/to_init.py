"""L2 to zero, L2 to the initial weights, and the Wasserstein distance to the initial distribution.

For each selected parameter θ (every parameter by default: weights, biases, norm scales)
with values θ₀ when the penalty was built:

* :class:`L2Penalty`         ``Σ_θ ‖θ‖²``                 — plain weight decay, the baseline;
* :class:`L2ToInit`          ``Σ_θ ‖θ − θ₀‖²``            — regenerative regularization;
* :class:`WassersteinToInit` ``Σ_θ ‖sort(θ) − sort(θ₀)‖²`` — ``n·W₂²`` between the empirical
  distribution of θ's entries and of θ₀'s (Lewandowski et al., 2024): in one dimension the
  optimal transport plan matches order statistics, so sorting gives the exact distance.
  It only asks the *distribution* of a layer's weights to stay the initial one, not each
  weight, so it is never larger than :class:`L2ToInit`.

``reduction="mean"`` averages over entries instead (then Wasserstein is exactly ``W₂²``).
The snapshot θ₀ is kept in buffers, so ``penalty.to(device)`` and ``state_dict()`` carry it.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Linear(4, 3)
>>> w2, l2 = sk.regularize.WassersteinToInit(model), sk.regularize.L2ToInit(model)
>>> float(w2()), float(l2())          # zero at initialization
(0.0, 0.0)
>>> with torch.no_grad():
...     _ = model.weight.copy_(model.weight.flip(0, 1))   # same values, permuted
>>> float(w2()) == 0.0 and float(l2()) > 0
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import Patterns, Penalty, Target


class _ParameterPenalty(Penalty):
    needs_matrix = False

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], *, include: Patterns = None,
                 exclude: Patterns = None, reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, reduction="sum")
        if reduction not in ("sum", "mean"):
            raise SpectrakitError(f"reduction={reduction!r} is not one of sum, mean")
        self.entry_reduction = reduction  # within a tensor; tensors are always summed

    def reduce(self, squared: torch.Tensor) -> torch.Tensor:
        return squared.sum() if self.entry_reduction == "sum" else squared.mean()

    def extra_repr(self) -> str:
        return f"{len(self.targets)} parameters, reduction={self.entry_reduction!r}"


class L2Penalty(_ParameterPenalty):
    """``Σ_θ ‖θ‖²`` over the selected parameters (``mean`` per tensor with ``reduction="mean"``)."""

    def term(self, target: Target, index: int) -> torch.Tensor:
        return self.reduce(target.value().square())


class _ToInit(_ParameterPenalty):
    """Keeps a frozen copy of each selected parameter, as it was at construction."""

    def __init__(self, source: Any, *, include: Patterns = None, exclude: Patterns = None,
                 reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, reduction=reduction)
        for i, target in enumerate(self.targets):
            self.register_buffer(f"init_{i}", self.reference(target.value().detach()).clone())

    def reference(self, initial: torch.Tensor) -> torch.Tensor:
        return initial

    def initial(self, index: int) -> torch.Tensor:
        return getattr(self, f"init_{index}")

    def reset(self) -> None:
        """Take the current values as the new reference (e.g. at a task boundary, if wanted)."""
        with torch.no_grad():
            for i, target in enumerate(self.targets):
                self.initial(i).copy_(self.reference(target.value().detach()))


class L2ToInit(_ToInit):
    """``Σ_θ ‖θ − θ₀‖²``: each weight pulled back to its own initial value."""

    def term(self, target: Target, index: int) -> torch.Tensor:
        value = target.value()
        return self.reduce((value - self.initial(index).to(value.dtype)).square())


class WassersteinToInit(_ToInit):
    """``Σ_θ ‖sort(θ) − sort(θ₀)‖²``: each tensor's value distribution pulled back to its initial one."""

    def reference(self, initial: torch.Tensor) -> torch.Tensor:
        return initial.flatten().sort().values  # sorted once: the reference never changes

    def term(self, target: Target, index: int) -> torch.Tensor:
        value = target.value()
        ordered = value.flatten().sort().values  # sort is differentiable (a gather of the entries)
        return self.reduce((ordered - self.initial(index).to(value.dtype)).square())
