"""``sigma_min`` and ``condition_number = σ₁ / σ_min`` of an analyzed matrix, accurate or marked unresolved.

The spectrum ``analyze`` computes for a large matrix comes from its float32 Gram matrix, which
resolves singular values only above about ``√(max(m, n)·ε)·σ₁`` (≈ 3e-2·σ₁ for a side of 256):
below that, its smallest value can be anything from 0 to twice the truth, and so can the
condition number. Here the spectrum's own ``σ_min`` is kept when it lies above that floor;
otherwise it is computed again in float64 by :func:`spectrakit.linalg.smallest_singular_value`
(a float64 Gram matrix and inverse iteration, or the float64 SVD). A matrix whose ``σ_min`` is
below even float64's resolution gets ``sigma_min = condition_number = None`` and
``sigma_min_method = "unresolved"``, with ``sigma_min_bound`` the upper bound — never 0 or inf.

>>> import torch
>>> W = torch.randn(300, 200, dtype=torch.float64)
>>> row = conditioning_metrics(W, torch.linalg.svdvals(W), method="exact")
>>> S = torch.linalg.svdvals(W)
>>> abs(row["condition_number"] / float(S[0] / S[-1]) - 1) < 1e-9, row["sigma_min_method"]
(True, 'spectrum')
"""

from __future__ import annotations

from typing import Any

import torch

from .. import linalg
from ..linalg.smallest import resolution_floor


def conditioning_metrics(matrix: torch.Tensor | None, spectrum: torch.Tensor, *, method: str = "auto",
                         dtype: torch.dtype | None = None, shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """``sigma_min``, ``condition_number``, ``sigma_min_method`` and ``sigma_min_bound`` of one matrix.

    Args:
        matrix: the matrix ``spectrum`` was computed from with ``linalg.svdvals(matrix, method=method,
            dtype=dtype)``; ``None`` when the spectrum comes from elsewhere (a conv operator), in
            which case a value below the spectrum's floor is marked unresolved rather than refined.
        spectrum: the singular values, descending, with ``spectrum[0] > 0``.
        method, dtype: how ``spectrum`` was computed.
        shape: with ``matrix=None``, the shape whose Gram floor bounds the spectrum's accuracy.
    """
    largest = float(spectrum[0])
    if matrix is not None:
        result = linalg.smallest_singular_value(matrix, spectrum, method=method, dtype=dtype)
        value, source, bound = result.value, result.method, result.bound
    else:
        size = shape or (spectrum.numel(), spectrum.numel())
        floor = resolution_floor(size, dtype or torch.float32, "gram")
        resolved = float(spectrum[-1]) >= floor * largest
        value, source = (float(spectrum[-1]), "spectrum") if resolved else (None, "unresolved")
        bound = None if resolved else floor * largest
    return {
        "sigma_min": value,
        "condition_number": None if value is None else largest / value,
        "sigma_min_method": source,
        "sigma_min_bound": bound,
    }
