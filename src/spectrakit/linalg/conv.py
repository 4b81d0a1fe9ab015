"""Exact singular values of a convolution operator with circular padding.

A stride-1 convolution with circular padding on an ``n``-point (or ``h × w``) grid is
block-circulant, so the 2-D/1-D DFT block-diagonalizes it (Sedghi, Gupta & Long,
2019): its singular values are those of the ``c_out × c_in`` matrices

    K̂(ω) = Σ_t K[:, :, t] · exp(−2πi ⟨ω, t⟩ / n),   one per frequency ω,

``N·min(c_out, c_in)`` values in all (``N`` = number of grid points). An FFT of the
zero-padded kernel gives every ``K̂(ω)`` at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix


def _spatial_shape(kernel: torch.Tensor, input_shape: Sequence[int]) -> tuple[int, ...]:
    spatial_dims = kernel.ndim - 2
    if spatial_dims not in (1, 2):
        raise SpectrakitError(f"kernel of shape {tuple(kernel.shape)}: expected a Conv1d "
                              "(out, in, k) or Conv2d (out, in, kh, kw) kernel")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == spatial_dims + 1:  # (channels, *spatial) was given
        if shape[0] != kernel.shape[1]:
            raise SpectrakitError(f"input_shape {shape} has {shape[0]} channels but the kernel "
                                  f"expects {kernel.shape[1]}")
        shape = shape[1:]
    if len(shape) != spatial_dims:
        raise SpectrakitError(f"input_shape {tuple(input_shape)} does not match a "
                              f"{spatial_dims}-D kernel of shape {tuple(kernel.shape)}")
    for size, k in zip(shape, kernel.shape[2:]):
        if k > size:
            raise SpectrakitError(f"kernel size {k} exceeds the input size {size}")
    return shape


def conv_frequency_matrices(kernel: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """The per-frequency matrices ``K̂(ω)`` of shape ``(N, c_out, c_in)``, complex.

    Args:
        kernel: a conv weight ``(c_out, c_in, k₁, …)``.
        input_shape: the spatial size of the (circularly padded) input, one entry per kernel axis.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.ndim < 3:
        raise SpectrakitError("kernel: expected a Conv1d or Conv2d weight tensor")
    spatial = _spatial_shape(kernel, input_shape)
    dims = tuple(range(2, kernel.ndim))
    kernel = as_matrix(kernel, name="kernel")
    spectrum = torch.fft.fftn(kernel, s=spatial, dim=dims)
    return spectrum.flatten(2).permute(2, 0, 1)


def conv_singular_values(kernel: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """All singular values of the circular convolution operator, descending.

    Args:
        kernel: ``(c_out, c_in, k)`` or ``(c_out, c_in, kh, kw)`` (a Conv1d/Conv2d ``weight``).
        input_shape: the spatial size ``(n,)`` / ``(h, w)``, optionally with the
            channel count in front.

    >>> import spectrakit as sk
    >>> kernel = torch.randn(8, 4, 3, 3)
    >>> sk.linalg.conv_singular_values(kernel, (16, 16)).shape
    torch.Size([1024])
    """
    blocks = conv_frequency_matrices(kernel, input_shape)
    values = torch.linalg.svdvals(blocks).flatten()
    return values.sort(descending=True).values

