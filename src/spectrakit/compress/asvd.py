"""ASVD: activation-aware SVD (Yuan et al., 2023).

Input channels are scaled by their mean activation magnitude before the SVD and
unscaled after it, so that channels carrying large activations are approximated well:

.. math::  s_j = \\Big(\\tfrac{1}{N}\\sum_t |x_{tj}|\\Big)^{\\alpha}, \\quad
           W S = U \\Sigma V^T, \\quad W' = U_k \\Sigma_k V_k^T S^{-1}, \\quad S = \\mathrm{diag}(s)

with ``α = 0.5`` by default (the paper's setting). Channels that never fire are floored
at ``1e-6 · max s`` so that ``S`` stays invertible.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="asvd", rank=8, calibration=[torch.randn(256, 64)])
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

import torch

from ..errors import SpectrakitError
from .base import Method, Transform, positive_floor
from .calibration import LayerStatistics


class ActivationAwareSVD(Method):
    name = "asvd"
    needs = frozenset({"scale"})

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0 <= alpha <= 2:
            raise SpectrakitError(f"asvd: alpha={alpha!r} must be in [0, 2] (0.5 is the paper's default)")
        self.alpha = float(alpha)

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        assert stats is not None
        return Transform(right=positive_floor(stats.mean_abs()).pow(self.alpha))
