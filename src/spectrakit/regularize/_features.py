"""Input checks shared by the feature losses (they take activations, not weights)."""

from __future__ import annotations

import torch

from ..errors import SpectrakitError


def as_batch(features: torch.Tensor, name: str = "features", min_rows: int = 1) -> torch.Tensor:
    """``features`` as a ``(batch, dim)`` matrix (trailing axes flattened), fp32 at least."""
    if not isinstance(features, torch.Tensor):
        raise SpectrakitError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if features.ndim < 2:
        raise SpectrakitError(f"{name}: expected (batch, dim) activations, got shape {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise SpectrakitError(f"{name}: dtype {features.dtype} is not floating point")
    if features.shape[0] < min_rows:
        raise SpectrakitError(f"{name}: needs at least {min_rows} samples, got {features.shape[0]}")
    if not bool(torch.isfinite(features.detach()).all()):
        raise SpectrakitError(f"{name}: contains NaN or Inf values")
    features = features.flatten(1)
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
