"""Nuclear norm: the sum of singular values, the convex surrogate of rank.

    R(θ) = Σ_l ‖W_l‖_* = Σ_l Σ_i σ_i(W_l)

on each canonical ``out × in`` weight (conv kernels reshaped to ``out × in·k…``). Its
gradient is ``U Vᵀ`` (the polar factor), which shrinks every singular value by the same
amount — soft-thresholding of the spectrum, so small directions reach zero first and the
layer becomes low-rank. Zero only at ``W = 0``. ``normalized=True`` divides by ``‖W‖_F``,
a scale-free rank proxy between 1 and ``√rank``.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(6, 4, bias=False)
>>> penalty = sk.regularize.NuclearNormPenalty(layer)
>>> bool(torch.isclose(penalty(), torch.linalg.svdvals(layer.weight).sum()))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..linalg import svdvals
from ._base import Patterns, Penalty, Target


class NuclearNormPenalty(Penalty):
    """``Σ_l ‖W_l‖_*`` (or ``Σ_l ‖W_l‖_* / ‖W_l‖_F`` with ``normalized=True``)."""

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], *, normalized: bool = False,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.normalized = normalized

    def term(self, target: Target, index: int) -> torch.Tensor:
        W = target.matrix()
        # "exact": the LAPACK SVD, whose gradient U Vᵀ stays accurate for small σ
        # (the Gram route's √λ would have an unbounded derivative at σ → 0).
        nuclear = svdvals(W, method="exact").sum()
        if self.normalized:
            nuclear = nuclear / torch.linalg.vector_norm(W).clamp_min(torch.finfo(W.dtype).tiny)
        return nuclear
