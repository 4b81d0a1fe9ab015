"""Orthogonal convolution penalty: the kernel convolved with itself should be an identity.

A stride-``s`` convolution ``K`` (``c_out × c_in × k…``) is row-orthogonal as an operator
exactly when its kernel, correlated with itself at every shift that lands on the stride
grid, gives the identity at zero shift and nothing elsewhere (Wang et al., *Orthogonal
Convolutional Neural Networks*, CVPR 2020):

    L(K) = ‖ Conv(K, K, stride=s, padding=⌊(k−1)/s⌋·s) − I_r₀ ‖²_F

where ``Conv(K, K)`` treats the ``c_out`` filters as a batch of ``c_in``-channel images and
``I_r₀`` is ``I_{c_out}`` at the centre offset and zero at the others. It is zero exactly for
orthogonal convolutions (e.g. an orthogonal 1×1 kernel, or a kernel whose only non-zero tap
is an orthogonal matrix), and, unlike soft orthogonality of the reshaped kernel, it also
constrains the overlap between shifted filters. Grouped convs are penalized group by group;
a Linear weight (``kinds`` including ``"linear"``) is a 1-tap kernel, giving ``‖WWᵀ − I‖²_F``.

>>> import torch, spectrakit as sk
>>> conv = torch.nn.Conv2d(4, 4, 3, padding=1)
>>> with torch.no_grad():
...     _ = conv.weight.zero_(); conv.weight[:, :, 1, 1] = torch.linalg.qr(torch.randn(4, 4))[0]
>>> round(float(sk.regularize.OrthogonalConvPenalty(conv)()), 8)
0.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Patterns, Penalty, Target
from ._operators import as_tuple


class OrthogonalConvPenalty(Penalty):
    """``Σ_layers ‖Conv(K, K) − I_r₀‖²_F`` with the layer's own stride and groups.

    Args:
        stride: overrides the layers' stride (default: each conv's own; 1 for bare tensors).
        include, exclude, kinds, reduction: see :class:`~spectrakit.regularize.SpectralPenalty`;
            ``kinds`` defaults to conv layers.
    """

    default_kinds = ("conv1d", "conv2d")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], *,
                 stride: int | None = None, include: Patterns = None, exclude: Patterns = None,
                 kinds: str | Iterable[str] | None = None, reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.stride = stride

    def term(self, target: Target, index: int) -> torch.Tensor:
        K = target.kernel()
        if K.ndim == 2:  # a dense layer is a one-tap convolution
            K = K[..., None]
        if K.ndim > 4:
            K = K.reshape(*K.shape[:2], -1)[..., None]
        spatial = K.ndim - 2
        stride = as_tuple(self.stride if self.stride is not None else target.conv_option("stride", 1), spatial)
        padding = tuple((k - 1) // s * s for k, s in zip(K.shape[2:], stride))
        conv = F.conv1d if spatial == 1 else F.conv2d
        groups = int(target.conv_option("groups", 1))
        total = K.new_zeros(())
        for part in K.split(K.shape[0] // groups, dim=0):
            # the filters as a batch of images, correlated with the same filters
            self_conv = conv(part, part, stride=stride, padding=padding)
            centre: tuple[slice | int, ...] = (slice(None), slice(None), *(p // s for p, s in zip(padding, stride)))
            identity = torch.zeros_like(self_conv)
            identity[centre] = torch.eye(part.shape[0], dtype=K.dtype, device=K.device)
            total = total + (self_conv - identity).square().sum()
        return total
