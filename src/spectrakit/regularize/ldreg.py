"""LDReg: local dimensionality regularization of self-supervised features.

Huang et al., *LDReg: Local Dimensionality Regularized Self-Supervised Learning*, ICLR 2024.
Representations can span many dimensions globally yet collapse locally; LDReg raises the
*local intrinsic dimension* (LID) of every sample. With ``a_1 ≤ … ≤ a_k`` the distances from a
sample to its ``k`` nearest neighbours in a reference batch (itself excluded), the method-of-
moments estimate is

.. math::  \\widehat{\\mathrm{LID}} = \\frac{μ_k}{w_k - μ_k}, \\qquad
           μ_k = \\frac{1}{k-1}\\sum_{i<k} a_i, \\quad w_k = a_k

(for distances distributed as ``F(r) ∝ r^d`` near the sample it tends to ``d``). Comparing
local distance distributions under the Fisher–Rao metric turns "push every LID up" into a
penalty on the logarithm, so the loss added to the SSL objective is

.. math::  \\mathcal{L}_{\\mathrm{LDReg}} = -\\frac{β}{N} \\sum_i \\log \\widehat{\\mathrm{LID}}_i

with the reference batch detached (gradients move each sample, not its neighbours). The
paper's defaults: ``k = 64`` neighbours within the batch (clipped to ``N − 2`` here).

>>> import torch, spectrakit as sk
>>> ldreg = sk.regularize.LDReg(k=16)
>>> flat = torch.randn(256, 32) * torch.tensor([1.0] * 2 + [1e-3] * 30)   # locally 2-dimensional
>>> full = torch.randn(256, 32)
>>> bool(ldreg.lid(flat).mean() < ldreg.lid(full).mean()) and bool(ldreg(flat) > ldreg(full))
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpectrakitError
from ._features import as_batch


class LDReg(nn.Module):
    """``−β · mean_i log LID_i`` of a batch of representations (method-of-moments LID).

    Args:
        k: neighbours per sample (the paper's 64); clipped to ``batch − 2``.
        beta: the weight ``β`` of the term.
    """

    def __init__(self, k: int = 64, beta: float = 1.0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise SpectrakitError(f"LDReg: k={k!r} must be an integer ≥ 2")
        self.k, self.beta = k, float(beta)

    def lid(self, features: torch.Tensor, reference: torch.Tensor | None = None,
            name: str = "features") -> torch.Tensor:
        """Per-sample LID estimates ``μ_k / (w_k − μ_k)``, distances to ``reference`` (default: the
        batch itself, detached), each sample's zero distance to itself skipped.

        Args:
            features: ``(batch, dim)`` representations (trailing axes flattened).
            reference: the points to measure against; by default ``features.detach()``.
            name: what error messages call ``features``.
        """
        Z = as_batch(features, name=name, min_rows=3)
        R = Z.detach() if reference is None else as_batch(reference, name="reference", min_rows=3)
        if R.shape[1] != Z.shape[1]:
            raise SpectrakitError(f"reference: {R.shape[1]} features, but {name} has {Z.shape[1]}")
        k = min(self.k, R.shape[0] - 2)
        distances = torch.cdist(Z, R.to(Z.dtype), compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distances.topk(k + 1, dim=1, largest=False).values  # sorted, the first is the sample itself
        mean = nearest[:, 1:k].mean(dim=1)
        gap = nearest[:, k] - mean
        if not bool((gap > 0).all()):
            raise SpectrakitError(f"{name}: duplicate samples leave no spread among the nearest neighbours; "
                                  "the LID is undefined")
        return mean / gap

    def forward(self, features: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return -self.beta * self.lid(features, reference).log().mean()

    def extra_repr(self) -> str:
        return f"k={self.k}, beta={self.beta}"
