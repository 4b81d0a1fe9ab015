"""VICReg's variance and covariance terms: keep every feature alive and the features decorrelated.

For a batch of embeddings ``Z`` (``N × d``), with ``C(Z)`` its covariance matrix
(``1/(N−1)`` normalization) — Bardes, Ponce & LeCun, *VICReg*, ICLR 2022:

    v(Z) = 1/d · Σ_j max(0, γ − √(Var(z_j) + ε))        (hinge on each feature's std)
    c(Z) = 1/d · Σ_{i≠j} C(Z)_{ij}²                     (off-diagonal covariance)
    loss = μ·v(Z) + ν·c(Z)       summed over the embeddings given (both branches)

Defaults ``μ = 25, ν = 1, γ = 1, ε = 10⁻⁴`` are the paper's. The loss is zero for
decorrelated features whose standard deviations are at least ``γ``; the invariance term
(the distance between two branches) is left to the caller's own loss.

>>> import torch, spectrakit as sk
>>> Q = torch.linalg.qr(torch.randn(64, 8))[0]
>>> Z = torch.cat([Q, -Q]) * (127 / 2) ** 0.5      # mean 0, covariance exactly I
>>> float(sk.regularize.VICReg()(Z)) < 1e-6
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpectrakitError
from ._features import as_batch


class VICReg(nn.Module):
    """``μ·variance(Z) + ν·covariance(Z)``, summed over every embedding passed to ``forward``.

    Args:
        variance_weight: μ, the weight of the variance (hinge) term.
        covariance_weight: ν, the weight of the off-diagonal covariance term.
        gamma: the target standard deviation of each feature in the hinge max(0, γ − std).
        eps: added to the variance under the square root, for a stable gradient at zero variance.
    """

    def __init__(self, variance_weight: float = 25.0, covariance_weight: float = 1.0, gamma: float = 1.0,
                 eps: float = 1e-4) -> None:
        super().__init__()
        self.variance_weight, self.covariance_weight = variance_weight, covariance_weight
        self.gamma, self.eps = gamma, eps

    def variance(self, Z: torch.Tensor) -> torch.Tensor:
        std = (Z.var(dim=0) + self.eps).sqrt()
        return torch.relu(self.gamma - std).mean()

    @staticmethod
    def covariance(Z: torch.Tensor) -> torch.Tensor:
        centred = Z - Z.mean(dim=0)
        C = centred.mT @ centred / (Z.shape[0] - 1)
        off_diagonal = C - torch.diag_embed(C.diagonal())
        return off_diagonal.square().sum() / Z.shape[1]

    def forward(self, *embeddings: torch.Tensor) -> torch.Tensor:
        if not embeddings:
            raise SpectrakitError("VICReg: pass at least one batch of embeddings")
        values = []
        for i, Z in enumerate(embeddings):
            Z = as_batch(Z, name=f"embeddings[{i}]", min_rows=2)
            values.append(self.variance_weight * self.variance(Z) + self.covariance_weight * self.covariance(Z))
        return sum(values[1:], values[0])  # summed left to right from the first value

    def extra_repr(self) -> str:
        return (f"variance_weight={self.variance_weight}, covariance_weight={self.covariance_weight}, "
                f"gamma={self.gamma}")
