"""Cauchy–Schwarz orthogonality: a scale-adaptive penalty that vanishes on scaled orthogonal matrices.

For the smaller Gram matrix ``G`` (``n × n``) of a weight ``W``, Cauchy–Schwarz for the
Frobenius inner product of ``G`` and ``I`` gives ``(tr G)² = ⟨G, I⟩² ≤ ‖G‖²_F ‖I‖²_F``, so

    R(W) = n · ‖G‖²_F − (tr G)²  ≥ 0,

with equality exactly when ``G = c·I`` — the columns (rows, for a wide ``W``) are orthogonal
with one common norm, *whatever that norm is* (Taner, Wang & Studer, *Cauchy–Schwarz
Regularizers*, 2025). Unlike ``‖G − I‖²_F`` it does not fix the scale: the layer keeps the
magnitude it learns. ``R = Σ_{i<j} (λ_i − λ_j)²`` over ``G``'s eigenvalues, so it measures the
spread of the squared singular values. ``normalized=True`` divides by ``(tr G)²``, giving
the scale-invariant ``n·‖G‖²_F/(tr G)² − 1`` in ``[0, n − 1]``.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(5, 5, bias=False, dtype=torch.float64)
>>> with torch.no_grad():
...     _ = layer.weight.copy_(3.0 * torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0])   # orthogonal × 3
>>> abs(sk.regularize.CauchySchwarzOrthogonality(layer)().item()) < 1e-9
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._base import Patterns, Penalty, Target
from .orthogonality import smaller_gram


class CauchySchwarzOrthogonality(Penalty):
    """``Σ_l n_l‖G_l‖²_F − (tr G_l)²`` (divided by ``(tr G_l)²`` when ``normalized``)."""

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], *, normalized: bool = False,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.normalized = normalized

    def term(self, target: Target, index: int) -> torch.Tensor:
        G = smaller_gram(target.matrix())
        trace = G.diagonal().sum()
        gap = G.shape[0] * G.square().sum() - trace.square()
        if self.normalized:
            gap = gap / trace.square().clamp_min(torch.finfo(G.dtype).tiny)
        return gap
