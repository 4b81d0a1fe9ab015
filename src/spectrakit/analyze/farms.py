"""FARMS: the heavy-tail fit of an ESD averaged over fixed-aspect-ratio submatrices.

The ESD of an ``N × M`` matrix depends on its aspect ratio ``Q = N/M`` even when the
entries are pure noise (the Marchenko–Pastur law narrows as ``Q`` grows), so plain
``alpha`` is not comparable across layers of different shapes. FARMS (Fixed-Aspect-
Ratio Matrix Subsampling; seeds 000/002) cuts ``W`` into ``b × b`` windows —
``b = min(N, M, 256)`` by default, so every layer is seen at ``Q = 1`` — pools the
eigenvalues of the windows (their average ESD) and fits the power law to that:

    λ ∈ ⋃ₖ eig(W_kᵀ W_k),  W_k = W[rₖ : rₖ + b, cₖ : cₖ + b],   farms_alpha = α̂(λ).

Windows tile each dimension with stride ``b``; the last one is aligned to the edge,
so every weight is covered. At most ``max_blocks`` evenly spaced windows are kept
(16 windows of 256 cost about a tenth of a 768 × 3072 layer's own spectrum).
All windows share a shape, so their spectra come from one batched call to the core.

>>> import torch
>>> torch.manual_seed(0) and None
>>> W = torch.randn(64, 1024)
>>> farms_eigenvalues(W).shape     # 16 windows of 64 × 64
torch.Size([1024])
"""

from __future__ import annotations

from typing import Any

import torch

from .. import linalg
from .powerlaw import PowerLawFit, fit_power_law

DEFAULT_BLOCK = 256
DEFAULT_MAX_BLOCKS = 16


def _window_starts(size: int, block: int) -> list[int]:
    starts = list(range(0, size - block + 1, block))
    if starts[-1] + block < size:
        starts.append(size - block)
    return starts


def farms_eigenvalues(matrix: torch.Tensor, *, block: int = DEFAULT_BLOCK,
                      max_blocks: int = DEFAULT_MAX_BLOCKS, method: str = "auto",
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled eigenvalues (squared singular values) of the ``block × block`` windows of ``matrix``.

    ``matrix`` may also be a ``(count, rows, cols)`` stack (a conv kernel's per-tap slices,
    :mod:`~spectrakit.analyze.conv_slices`): the windows of every matrix in it are pooled,
    at most ``max_blocks`` in all, evenly spaced.
    """
    stack = matrix if matrix.ndim == 3 else matrix[None]
    rows, cols = stack.shape[1:]
    block = min(block, rows, cols)
    corners = [(m, r, c) for m in range(stack.shape[0])
               for r in _window_starts(rows, block) for c in _window_starts(cols, block)]
    if len(corners) > max_blocks:
        keep = torch.linspace(0, len(corners) - 1, max_blocks).round().long().tolist()
        corners = [corners[i] for i in keep]
    windows = torch.stack([stack[m, r:r + block, c:c + block] for m, r, c in corners])
    return linalg.svdvals(windows, method=method, dtype=dtype).double().square().flatten()


def farms_fit(matrix: torch.Tensor, *, xmin: str | float = "median",
              **options: Any) -> tuple[PowerLawFit, torch.Tensor]:
    """The power-law fit of the FARMS ESD of ``matrix``, and that ESD.

    ``xmin`` as in :func:`~spectrakit.analyze.powerlaw.fit_power_law`; the other
    options go to :func:`farms_eigenvalues`.

    >>> import torch
    >>> fit, evals = farms_fit(torch.randn(256, 1024))
    >>> fit.alpha > 1
    True
    """
    evals = farms_eigenvalues(matrix, **options)
    return fit_power_law(evals, xmin=xmin), evals
