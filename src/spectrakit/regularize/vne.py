"""Von Neumann entropy (VNE) of a batch of representations, to maximize or minimize.

For a batch ``H`` (``N × d``) with rows scaled to unit norm, the autocorrelation
``C = HᵀH / N`` has trace 1, so its eigenvalues ``λ_j = σ_j(H)²/N`` form a distribution and

    VNE(H) = − Σ_j λ_j log λ_j          ∈ [0, log min(N, d)]

(Kim et al., *VNE: An Effective Method for Improving Deep Representation by Manipulating
Eigenvalue Distribution*, CVPR 2023). It is ``log min(N, d)`` for isotropic features (all
``λ_j`` equal — no dimensional collapse) and 0 for features on one line (full collapse).
The loss is ``−VNE`` with ``maximize=True`` (spread the spectrum: against collapse, in
self-supervised or meta-learning) and ``+VNE`` otherwise (concentrate it).

>>> import torch, spectrakit as sk
>>> vne = sk.regularize.VNE()
>>> H = torch.eye(4).repeat(2, 1)            # isotropic: entropy log 4
>>> bool(torch.isclose(-vne(H), torch.log(torch.tensor(4.0))))
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..linalg import svdvals
from ._features import as_batch


class VNE(nn.Module):
    """``−VNE(H)`` (``maximize=True``) or ``VNE(H)`` for activations ``H`` of shape ``(batch, …)``."""

    def __init__(self, maximize: bool = True) -> None:
        super().__init__()
        self.maximize = maximize

    @staticmethod
    def entropy(features: torch.Tensor) -> torch.Tensor:
        """The von Neumann entropy of the normalized autocorrelation of ``features``."""
        H = as_batch(features)
        H = H / torch.linalg.vector_norm(H, dim=1, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
        # "exact": the LAPACK SVD keeps small eigenvalues' gradients finite (√ of Gram eigenvalues would not)
        eigenvalues = svdvals(H / H.shape[0] ** 0.5, method="exact").square()
        # 0·log 0 = 0: vanished directions add nothing to the entropy (and no NaN gradient)
        positive = eigenvalues > torch.finfo(H.dtype).tiny
        safe = torch.where(positive, eigenvalues, torch.ones_like(eigenvalues))
        return -(safe * safe.log()).sum()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        entropy = self.entropy(features)
        return -entropy if self.maximize else entropy

    def extra_repr(self) -> str:
        return f"maximize={self.maximize}"
