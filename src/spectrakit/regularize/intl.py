"""INTL: IterNorm whitening with a trace loss, a spectral transformation of the embeddings.

Weng et al., *Modulate Your Spectrum in Self-Supervised Learning*, ICLR 2024. IterNorm
(Huang et al., CVPR 2019) whitens a batch ``Z`` (``N × d``) by a few Newton–Schulz steps
towards ``Σ^{-1/2}`` instead of an eigendecomposition:

.. math::  Z_c = Z - \\bar z, \\quad Σ = Z_c^T Z_c / N + εI, \\quad Σ_N = Σ / \\mathrm{tr}\\,Σ,
           \\quad P_0 = I, \\quad P_k = \\tfrac12 (3 P_{k-1} - P_{k-1}^3 Σ_N), \\quad
           \\hat Z = Z_c P_T / \\sqrt{\\mathrm{tr}\\,Σ}

With ``T`` finite this is a *spectral transformation*: an eigenvalue ``s`` of ``Σ`` comes
out as ``(s − ε) f_T(s / tr Σ)² / tr Σ`` with ``f_0 = 1``, ``f_k(λ) = ½(3f_{k−1} − f_{k−1}³ λ)``,
which lifts small eigenvalues towards 1 without forcing them there. (This uncoupled
iteration is numerically stable for a handful of steps; run for dozens on an
ill-conditioned batch it blows up, so keep ``iterations`` small.) INTL adds a trace
loss on the whitened features, each one's variance pulled to 1 (``1/(N−1)`` variance):

.. math::  \\mathrm{TL}(\\hat Z) = \\sum_j (\\mathrm{Var}(\\hat z_j) - 1)^2

and trains on ``invariance(Ẑ₁, Ẑ₂) + β · (TL(Ẑ₁) + TL(Ẑ₂))`` for two views; the invariance
term (e.g. MSE of the normalized whitened embeddings) is left to the caller, as in
:class:`VICReg`. ``forward`` returns the summed trace loss of every embedding passed;
:meth:`INTL.whiten` gives the whitened batch for the invariance term.

``whitening="exact"`` replaces the ``T`` IterNorm steps by the converged root,
``Ẑ = Z_c Σ^{-1/2}`` through :func:`spectrakit.linalg.inv_sqrtm` (coupled Newton–Schulz, products
only, differentiable): full whitening, every eigenvalue mapped to 1 — no longer the paper's
spectral transformation, which is why it is not the default.

>>> import torch, spectrakit as sk
>>> intl = sk.regularize.INTL(iterations=4)
>>> z1, z2 = torch.randn(256, 16), torch.randn(256, 16)
>>> w1, w2 = intl.whiten(z1), intl.whiten(z2)
>>> loss = torch.nn.functional.mse_loss(w1, w2) + 0.01 * (intl.trace_loss(w1) + intl.trace_loss(w2))
>>> w1.shape
torch.Size([256, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpectrakitError
from ..linalg import inv_sqrtm
from ._features import as_batch

WHITENINGS = ("iternorm", "exact")


class INTL(nn.Module):
    """Trace loss of IterNorm-whitened embeddings (``T`` = ``iterations`` Newton–Schulz steps).

    Args:
        iterations: Newton–Schulz steps T of the IterNorm whitening.
        eps: ridge ``ε·I`` added to the batch covariance Σ before whitening (keeps a rank-deficient
            batch invertible).
        whitening: ``"iternorm"`` (the paper's ``T`` steps) or ``"exact"`` (``Σ^{-1/2}`` by
            :func:`spectrakit.linalg.inv_sqrtm`; ``iterations`` is then unused).
    """

    def __init__(self, iterations: int = 4, eps: float = 1e-5, whitening: str = "iternorm") -> None:
        super().__init__()
        if not isinstance(iterations, int) or iterations < 1:
            raise SpectrakitError(f"INTL: iterations={iterations!r} must be a positive integer")
        if not eps >= 0:
            raise SpectrakitError(f"INTL: eps={eps!r} must be >= 0")
        if whitening not in WHITENINGS:
            raise SpectrakitError(f"INTL: whitening={whitening!r} is not one of {', '.join(WHITENINGS)}")
        self.iterations, self.eps, self.whitening = iterations, float(eps), whitening

    def whiten(self, Z: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        """``Ẑ = Z_c P_T / √tr Σ``: the batch (``N × d``) after ``iterations`` IterNorm steps."""
        Z = as_batch(Z, name=name, min_rows=2)
        centred = Z - Z.mean(dim=0)
        eye = torch.eye(Z.shape[1], dtype=Z.dtype, device=Z.device)
        sigma = centred.mT @ centred / Z.shape[0] + self.eps * eye
        trace = sigma.diagonal().sum()
        if not bool(trace > 0):
            raise SpectrakitError(f"INTL: {name} has no variance to whiten (every sample is the same)")
        if self.whitening == "exact":
            return centred @ inv_sqrtm(sigma, name=f"INTL: the covariance of {name}")
        normalized = sigma / trace
        P = eye
        for _ in range(self.iterations):
            P = 0.5 * (3 * P - torch.linalg.matrix_power(P, 3) @ normalized)
        return centred @ P / trace.sqrt()

    @staticmethod
    def trace_loss(whitened: torch.Tensor) -> torch.Tensor:
        """``Σ_j (Var(ẑ_j) − 1)²`` over the features of a whitened batch."""
        return (whitened.var(dim=0) - 1).square().sum()

    def forward(self, *embeddings: torch.Tensor) -> torch.Tensor:
        if not embeddings:
            raise SpectrakitError("INTL: pass at least one batch of embeddings")
        losses = [self.trace_loss(self.whiten(Z, name=f"embeddings[{i}]")) for i, Z in enumerate(embeddings)]
        return torch.stack(losses).sum()

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, eps={self.eps}, whitening={self.whitening!r}"
