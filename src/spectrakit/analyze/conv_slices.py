"""weightwatcher's conv treatment: one ESD pooled from the per-tap slices of a kernel.

A conv kernel ``K`` of shape ``(out, in, k₁, …)`` applies, at each kernel tap
``t = (i, j)``, the ``out × in`` matrix ``K_t = K[:, :, i, j]``. weightwatcher 0.7.7
(the reference of the heavy-tailed self-regularization literature) does not fit the
reshaped ``out × in·k₁k₂`` matrix but the union of the taps' eigenvalues:

    λ ∈ ⋃ₜ eig(c · K_tᵀ K_t),     t = 1 … k₁k₂,

``min(out, in)`` eigenvalues per tap, ``k₁k₂ · min(out, in)`` in all (its
``num_evals``), and fits the power law and the Marchenko–Pastur bulk to that pooled
ESD with the aspect ratio of one slice, ``Q = max(out, in) / min(out, in)``.
``c`` is its ``conv2d_norm`` (on by default): every Conv2d slice is scaled by
``√(1/2)`` before its SVD, so ``c = 1/2``. Conv1d kernels are sliced the same way
(per tap) without that factor, which weightwatcher applies to Conv2d only.

weightwatcher also skips a Conv2d layer whose eigenvalue count exceeds its
``max_evals`` (15 000) or is below ``min_evals`` (8), and its count is wrong for kernels
with an even number of taps and fewer outputs than inputs (it counts ``k₁k₂ · in``;
:func:`weightwatcher_eval_count`). spectrakit counts ``k₁k₂ · min(out, in)`` (the
``num_evals`` column) and analyzes every such layer; :func:`weightwatcher_skips` says
which ones weightwatcher leaves out, for the parity bench.

Example::

    >>> import torch
    >>> kernel = torch.randn(16, 8, 3, 3)
    >>> tap_slices(kernel).shape          # 9 taps of 16 × 8
    torch.Size([9, 16, 8])
    >>> pooled_singular_values(kernel).shape   # 9 · min(16, 8) values
    torch.Size([72])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import linalg

#: How a conv kernel becomes a spectrum: one reshaped matrix, or its pooled per-tap slices.
CONV_TREATMENTS = ("reshape", "slices")
#: weightwatcher's conv2d_norm: each Conv2d slice is multiplied by √(1/2) before its SVD.
CONV2D_NORM_SCALE = math.sqrt(0.5)
#: weightwatcher 0.7.7 skips a Conv2d layer with more pooled eigenvalues than this (``max_evals``)...
WEIGHTWATCHER_MAX_EVALS = 15_000
#: ...or fewer than this (``min_evals``).
WEIGHTWATCHER_MIN_EVALS = 8


def tap_slices(kernel: torch.Tensor) -> torch.Tensor:
    """The ``(taps, out, in)`` stack of per-tap matrices of a ``(out, in, *k)`` kernel (a contiguous copy).

    Args:
        kernel: a Conv1d/Conv2d/Conv3d weight in PyTorch's layout.
    """
    out_channels, in_channels = kernel.shape[:2]
    # (out, in, *k) -> (*k, out, in): tap t is K[:, :, t] in row-major tap order. Copied
    # through one 2-D transpose, which torch does in cache-sized tiles (a copy of the 3-D
    # permuted view is several times slower, and a product on that strided view slower still).
    flat = kernel.reshape(out_channels * in_channels, -1)
    return flat.t().contiguous().reshape(-1, out_channels, in_channels)


def slice_scale(kernel: torch.Tensor, conv2d_norm: bool) -> float:
    """The factor on each slice: weightwatcher's ``√(1/2)`` for a Conv2d kernel with ``conv2d_norm``, else 1.

    Args:
        kernel: the conv kernel (its rank tells Conv2d from the others).
        conv2d_norm: weightwatcher's ``conv2d_norm`` option.
    """
    return CONV2D_NORM_SCALE if conv2d_norm and kernel.ndim == 4 else 1.0


def degenerate_slices_reason(kernel: torch.Tensor) -> str | None:
    """Why the per-tap slices of ``kernel`` have no spectrum (a ``1 × n`` slice), or None.

    Args:
        kernel: the conv kernel.
    """
    out_channels, in_channels = kernel.shape[:2]
    if min(out_channels, in_channels) < 2:
        return (f"per-tap slices are {out_channels}x{in_channels}: one singular value each, no spectrum "
                "(conv='reshape' analyzes this layer)")
    return None


def pooled_singular_values(kernel: torch.Tensor, *, conv2d_norm: bool = True, method: str = "auto",
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Singular values of every tap slice of ``kernel``, scaled, pooled and sorted descending (float64).

    Args:
        kernel: a ``(out, in, *k)`` conv kernel.
        conv2d_norm: scale Conv2d slices by ``√(1/2)`` as weightwatcher does by default.
        method, dtype: as in :func:`spectrakit.linalg.svdvals` (one batched call for all taps).
    """
    values = linalg.svdvals(tap_slices(kernel), method=method, dtype=dtype).double().cpu().flatten()
    values = values * slice_scale(kernel, conv2d_norm)
    return values.sort(descending=True).values


def esd_shape(kernel: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of one slice, which sets the aspect ratio of the pooled ESD's fits.

    Args:
        kernel: the conv kernel.
    """
    return int(kernel.shape[0]), int(kernel.shape[1])


def weightwatcher_eval_count(shape: Sequence[int]) -> int:
    """The eigenvalue count weightwatcher 0.7.7 checks against its limits for a Conv2d kernel.

    It should be ``taps · min(out, in)``. weightwatcher swaps its ``(N, M)`` once per tap
    whenever a slice is wider than tall, so when ``out < in`` and the tap count is even the
    swaps cancel and it counts ``taps · in`` instead: a ``128 × 256 × 8 × 8`` kernel has 8 192
    eigenvalues but is counted as 16 384 and skipped.

    Args:
        shape: the kernel's ``(out, in, kh, kw)``.
    """
    out_channels, in_channels = shape[0], shape[1]
    taps = math.prod(shape[2:])
    counted = in_channels
    if out_channels < in_channels and taps % 2 == 1:
        counted = out_channels
    return taps * counted


def weightwatcher_skips(shape: Sequence[int]) -> bool:
    """Whether weightwatcher 0.7.7 skips a Conv2d kernel of this shape for its eigenvalue count.

    Args:
        shape: the kernel's ``(out, in, kh, kw)``; other ranks are never skipped by this rule.
    """
    if len(shape) != 4:
        return False
    return not WEIGHTWATCHER_MIN_EVALS <= weightwatcher_eval_count(shape) <= WEIGHTWATCHER_MAX_EVALS
