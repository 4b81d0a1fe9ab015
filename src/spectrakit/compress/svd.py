"""Plain truncated SVD: keep the top-``k`` singular triplets of the weight itself.

.. math::  W = U \\Sigma V^T \\;\\Rightarrow\\; W' = U_k \\Sigma_k V_k^T

The loss of dropping ``σᵢ`` is ``σᵢ²`` of the *weight* (Frobenius error, Eckart–Young
optimal); no calibration data is used.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> report = sk.compress(model, method="svd", rank=8)
>>> report.layers["0"].rank
8
"""

from __future__ import annotations

import torch

from .base import Method, Transform
from .calibration import LayerStatistics


class PlainSVD(Method):
    name = "svd"
    needs = frozenset()

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        return Transform()
