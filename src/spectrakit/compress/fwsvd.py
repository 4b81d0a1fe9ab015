"""FWSVD: Fisher-weighted SVD (Hsu et al., 2022).

Each output row ``i`` of ``W`` is weighted by its Fisher information, estimated from the
squared gradients of the loss on the calibration batches, summed along the row:

.. math::  d_i = \\sqrt{\\textstyle\\sum_j \\sum_b (\\partial L_b / \\partial W_{ij})^2},
           \\quad D W = U \\Sigma V^T, \\quad W' = D^{-1} U_k \\Sigma_k V_k^T,
           \\quad D = \\mathrm{diag}(d)

Rows whose weights never received a gradient are floored at ``1e-6 · max d``. The loss
is the model's own (``.loss``), next-token cross-entropy for token-id batches of a
language model, or ``loss_fn(model, batch)``.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
>>> batches = [torch.randn(32, 16) for _ in range(2)]
>>> loss = lambda model, x: model(x).square().mean()
>>> report = sk.compress(model, method="fwsvd", rank=2, calibration=batches, loss_fn=loss)
>>> report.layers["2"].rank
2
"""

from __future__ import annotations

import torch

from .base import Method, Transform, positive_floor
from .calibration import LayerStatistics


class FisherWeightedSVD(Method):
    name = "fwsvd"
    needs = frozenset({"fisher"})

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        assert stats is not None
        if stats.fisher is None:  # the layer does not influence the loss: plain SVD
            return Transform()
        return Transform(left=positive_floor(stats.fisher.sqrt()))
