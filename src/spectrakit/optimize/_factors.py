"""Kronecker factors ``L = Σ G Gᵀ``, ``R = Σ GᵀG`` and their eigendecompositions, shared
by :class:`~spectrakit.optimize.SOAP` and :class:`~spectrakit.optimize.Shampoo`.

A side longer than ``max_dim`` gets no factor (``None``): it is left unpreconditioned,
since its ``d × d`` factor and ``d³`` eigendecomposition would cost more than they give.
"""

from __future__ import annotations

import torch

from ..linalg import gram_spectrum


def new_factors(G: torch.Tensor, max_dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Zero ``m × m`` and ``n × n`` factors for the ``m × n`` gradient ``G`` (``None`` past ``max_dim``)."""
    m, n = G.shape
    left = G.new_zeros(m, m) if m <= max_dim else None
    right = G.new_zeros(n, n) if n <= max_dim else None
    return left, right


def accumulate(factor: torch.Tensor | None, outer: torch.Tensor | None, beta: float) -> None:
    """``factor ← β·factor + (1 − β)·outer`` (``β = 1``: ``factor ← factor + outer``, a running sum)."""
    if factor is None or outer is None:
        return
    if beta == 1.0:
        factor.add_(outer)
    else:
        factor.lerp_(outer, 1 - beta)


def eigh(factor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, ≥ 0) and eigenvectors of the symmetric ``factor``, in ``dtype``,
    by the core's Gram eigensolver (``factor`` is a Gram matrix ``Σ G Gᵀ``)."""
    roots, vectors = gram_spectrum(factor.to(dtype))
    return roots.square(), vectors
