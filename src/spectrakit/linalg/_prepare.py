"""Input checks and dtype promotion shared by every routine in :mod:`spectrakit.linalg`."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError, SpectrakitError

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype a spectrum is computed in: fp16/bf16 are promoted to fp32
    (their eigen-solvers are missing or inaccurate); ``requested`` wins when given."""
    if requested is not None:
        if not requested.is_floating_point and not requested.is_complex:
            raise SpectrakitError(f"dtype={requested} is not a floating-point type")
        return requested
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def as_matrix(W: torch.Tensor, dtype: torch.dtype | None = None, name: str = "W",
              check_finite: bool = True) -> torch.Tensor:
    """Validate ``W`` (shape ``(..., m, n)``) and return it in its compute dtype.

    Raises :class:`SpectrakitError` naming ``name`` for a non-tensor, fewer than two
    dimensions, an integer or boolean dtype, a meta tensor or non-finite values.
    """
    if not isinstance(W, torch.Tensor):
        raise SpectrakitError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise SpectrakitError(f"{name}: expected a matrix (…, m, n), got shape {tuple(W.shape)}")
    if not (W.dtype.is_floating_point or W.dtype.is_complex):
        raise SpectrakitError(f"{name}: dtype {W.dtype} is not floating point; cast it first")
    if W.is_meta:
        raise SpectrakitError(f"{name}: is a meta tensor and holds no data")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        raise SpectrakitError(f"{name}: empty matrix of shape {tuple(W.shape)}")
    W = W.to(compute_dtype(W.dtype, dtype))
    if check_finite and not all_finite(W):
        raise NonFiniteError(f"{name}: contains NaN or Inf values")
    return W


def all_finite(W: torch.Tensor, chunk_elements: int = 1 << 22) -> bool:
    """Whether every entry of ``W`` is finite.

    First one sum: NaN and ±Inf entries always make it non-finite, so a finite sum settles
    the question in a single pass with no temporaries; only a non-finite sum (bad entries,
    or finite ones that overflow when added) takes the exact ``isfinite`` test, in row
    slices, since ``isfinite`` allocates a temporary of the tensor's full size. A transposed
    view is read in its storage order, several times faster to scan.
    """
    if W.ndim >= 2 and not W.is_contiguous() and W.mT.is_contiguous():
        W = W.mT
    if bool(torch.isfinite(W.sum())):
        return True
    if W.ndim < 2 or W.numel() <= chunk_elements:
        return bool(torch.isfinite(W).all())
    rows = max(1, chunk_elements // max(1, W.numel() // W.shape[-2]))
    return all(bool(torch.isfinite(part).all()) for part in W.split(rows, dim=-2))


def check_rank(k: int | None, W: torch.Tensor) -> int:
    """``k`` clipped to nothing: it must lie in ``1..min(m, n)``; ``None`` means all."""
    full = min(W.shape[-2], W.shape[-1])
    if k is None:
        return full
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > full:
        raise SpectrakitError(f"k={k!r} must be an integer in 1..{full} for a matrix of shape "
                              f"{tuple(W.shape[-2:])}")
    return k


def transpose(W: torch.Tensor) -> torch.Tensor:
    """Conjugate transpose of the last two dimensions."""
    return W.mH if W.is_complex() else W.mT
