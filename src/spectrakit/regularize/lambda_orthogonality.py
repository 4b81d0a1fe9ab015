"""λ-orthogonality: a relaxed orthogonality constraint on an affine map between two representation spaces.

Ricci et al., *λ-Orthogonality Regularization for Compatible Representation Learning*, 2025:
to make a new model's features ``z`` usable where an old model's ``y`` were, learn an affine map
``φ(z) = W z + b`` into the old space. A free affine map adapts well to the data but may distort
the new space; an orthogonal one preserves it but cannot adapt. The map is kept *λ-orthogonal*
instead — within ``λ`` of the orthogonal matrices in the Gram sense — by the penalty

.. math::  R_λ(W) = \\max(0,\\; \\|G - I\\|_F - λ)^2, \\qquad G = W^TW \\text{ (or } WW^T \\text{ if wide)}

zero on the whole set ``‖G − I‖_F ≤ λ`` (``λ = 0``: soft orthogonality ``‖G − I‖²_F``; ``λ → ∞``:
a free affine map). The training loss is the caller's alignment term plus ``μ·R_λ(W)``.
(The hinge-squared form is how spectrakit writes the constraint ``‖WᵀW − I‖_F ≤ λ`` as a smooth
penalty; the paper's trade-off parameter is the same ``λ``.)

:class:`LambdaOrthogonality` is the penalty on any selected weights; :class:`CompatibleMap` is the
affine map itself, initialized orthogonal, with its penalty at hand.

>>> import torch, spectrakit as sk
>>> mapping = sk.regularize.CompatibleMap(16, 16, lam=0.5)
>>> z, y = torch.randn(64, 16), torch.randn(64, 16)
>>> loss = torch.nn.functional.mse_loss(mapping(z), y) + 10.0 * mapping.penalty()
>>> float(mapping.penalty())          # orthogonal at initialization
0.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import Patterns, Penalty, Target
from .orthogonality import smaller_gram


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < float("inf"):
        raise SpectrakitError(f"lam={lam!r} must be a finite number ≥ 0")
    return float(lam)


def lambda_orthogonality(W: torch.Tensor, lam: float) -> torch.Tensor:
    """``max(0, ‖G − I‖_F − λ)²`` for the smaller Gram matrix ``G`` of ``W``.

    Args:
        W: a matrix.
        lam: the tolerated distance ``λ ≥ 0``.
    """
    G = smaller_gram(W)
    squared = (G - torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)).square().sum()
    if lam == 0:
        return squared
    # clamped so that an exactly orthogonal W has a zero (not 0 · ∞) gradient
    return torch.relu(squared.clamp_min(torch.finfo(G.dtype).tiny).sqrt() - lam).square()


class LambdaOrthogonality(Penalty):
    """``Σ_layers max(0, ‖G − I‖_F − λ)²``: zero for every weight within ``λ`` of orthogonal.

    Args:
        source: a model, a dict of tensors or a list of tensors.
        lam: the tolerated distance ``λ ≥ 0`` (``0`` is ``SoftOrthogonality(mode="so")``).
        include, exclude, kinds, reduction: see :class:`~spectrakit.regularize.SpectralPenalty`.
    """

    default_kinds = ("linear", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], lam: float = 0.1, *,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        self.lam = _check_lam(lam)
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)

    def term(self, target: Target, index: int) -> torch.Tensor:
        return lambda_orthogonality(target.matrix(), self.lam)


class CompatibleMap(nn.Module):
    """``φ(z) = W z + b`` from a new representation space (``in_features``) to an old one
    (``out_features``), ``W`` initialized (semi-)orthogonal, with :meth:`penalty` ``= R_λ(W)``.

    Args:
        in_features: the new model's feature size.
        out_features: the old model's feature size.
        lam: the tolerated distance ``λ ≥ 0`` from orthogonality.
        bias: learn ``b`` as well.
        dtype: of the map's parameters.
    """

    def __init__(self, in_features: int, out_features: int, lam: float = 0.1, *, bias: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.lam = _check_lam(lam)
        self.linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        with torch.no_grad():
            nn.init.orthogonal_(self.linear.weight)
            if bias:
                self.linear.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def penalty(self) -> torch.Tensor:
        """``max(0, ‖WᵀW − I‖_F − λ)²`` of the current map."""
        return lambda_orthogonality(self.linear.weight, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
