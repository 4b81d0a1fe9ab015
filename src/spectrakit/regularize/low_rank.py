"""Robust low-rank training: a ``U S Vᵀ`` layer kept near the Stiefel manifold and well conditioned.

Savostianova et al., *Robust low-rank training via approximate orthonormal constraints*, NeurIPS
2023. A low-rank layer ``W = U S Vᵀ`` (``U`` ``out × r``, ``S`` ``r × r``, ``V`` ``in × r``) costs
``r(in + out + r)`` parameters, but its singular values — those of ``S`` once ``U`` and ``V`` are
orthonormal — tend to explode, and with them the layer's condition number and its sensitivity
to adversarial perturbations. The method keeps the factors on (near) the Stiefel manifold and
pulls ``S`` towards a multiple of an orthogonal matrix, whose condition number is 1:

.. math::  R(U, S, V) = \\|U^TU - I\\|_F^2 + \\|V^TV - I\\|_F^2
           + γ\\,\\Big\\|S^TS - \\tfrac{\\|S\\|_F^2}{r} I\\Big\\|_F^2

The last term is zero exactly when all singular values of ``S`` are equal — at any scale, so
the layer keeps its magnitude. :meth:`LowRankLinear.retract_` maps ``U`` and ``V`` back onto the
manifold exactly (QR, the triangular factors moved into ``S``; ``W`` unchanged), which the paper's
integrator does at every step; the penalty keeps them near it between retractions.

>>> import torch, spectrakit as sk
>>> layer = sk.regularize.LowRankLinear.from_linear(torch.nn.Linear(32, 16), rank=4)
>>> layer(torch.randn(8, 32)).shape
torch.Size([8, 16])
>>> penalty = sk.regularize.ApproximateOrthonormality(layer, conditioning=1.0)
>>> float(penalty()) > 0            # the SVD factors are orthonormal, but S = diag(σ) is not flat
True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpectrakitError
from ..linalg import svd


def _minus_identity_norm(G: torch.Tensor) -> torch.Tensor:
    return (G - torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)).square().sum()


class LowRankLinear(nn.Module):
    """``y = ((x V) Sᵀ) Uᵀ + b``: a linear layer stored as ``U S Vᵀ`` of rank ``rank``.

    Args:
        in_features, out_features: the layer's sizes.
        rank: ``r``, at most ``min(in_features, out_features)``.
        bias: learn a bias.
        dtype, device: of the factors.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise SpectrakitError(f"rank={rank!r} must be an integer in 1..{min(in_features, out_features)} for a "
                                  f"{out_features} × {in_features} layer")
        self.U = nn.Parameter(torch.linalg.qr(torch.randn(out_features, rank, dtype=dtype, device=device)).Q)
        self.V = nn.Parameter(torch.linalg.qr(torch.randn(in_features, rank, dtype=dtype, device=device)).Q)
        self.S = nn.Parameter(torch.eye(rank, dtype=dtype, device=device) * (1.0 / in_features) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear`` (its truncated SVD, through
        :func:`spectrakit.linalg.svd`), bias copied.

        Args:
            linear: the layer to factorize.
            rank: ``r``.
        """
        if not isinstance(linear, nn.Linear):
            raise SpectrakitError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach()
        layer = cls(W.shape[1], W.shape[0], rank, bias=linear.bias is not None, dtype=W.dtype, device=W.device)
        U, S, Vh = svd(W, k=rank, method="exact")
        with torch.no_grad():
            layer.U.copy_(U)
            layer.S.copy_(torch.diag(S))
            layer.V.copy_(Vh.mT)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def rank(self) -> int:
        """``r``, the number of columns of ``U`` and ``V``."""
        return self.S.shape[0]

    def weight(self) -> torch.Tensor:
        """The dense ``U S Vᵀ`` (``out × in``)."""
        return self.U @ self.S @ self.V.mT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.V) @ self.S.mT @ self.U.mT
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def retract_(self) -> LowRankLinear:
        """Put ``U`` and ``V`` exactly on the Stiefel manifold (``U = Q_U R_U``, ``V = Q_V R_V``,
        ``S ← R_U S R_Vᵀ``); the layer's weight is unchanged."""
        Q_U, R_U = torch.linalg.qr(self.U)
        Q_V, R_V = torch.linalg.qr(self.V)
        self.S.copy_(R_U @ self.S @ R_V.mT)
        self.U.copy_(Q_U)
        self.V.copy_(Q_V)
        return self

    def orthonormality(self) -> torch.Tensor:
        """``‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F``."""
        return _minus_identity_norm(self.U.mT @ self.U) + _minus_identity_norm(self.V.mT @ self.V)

    def conditioning(self) -> torch.Tensor:
        """``‖SᵀS − (‖S‖²_F / r) I‖²_F``: zero when every singular value of ``S`` is the same."""
        G = self.S.mT @ self.S
        level = G.diagonal().sum() / self.rank
        return (G - level * torch.eye(self.rank, dtype=G.dtype, device=G.device)).square().sum()

    def extra_repr(self) -> str:
        return f"in_features={self.V.shape[0]}, out_features={self.U.shape[0]}, rank={self.rank}"


class ApproximateOrthonormality(nn.Module):
    """``Σ_layers ‖UᵀU − I‖² + ‖VᵀV − I‖² + γ ‖SᵀS − (‖S‖²/r) I‖²`` over every :class:`LowRankLinear`.

    Args:
        model: a :class:`LowRankLinear` or a model containing some.
        conditioning: ``γ``, the weight of the flat-spectrum term on ``S``.
    """

    def __init__(self, model: nn.Module, conditioning: float = 1.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise SpectrakitError(f"ApproximateOrthonormality: expected an nn.Module, got {type(model).__name__}")
        self.layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        if not self.layers:
            raise SpectrakitError("ApproximateOrthonormality: the model has no LowRankLinear layer "
                                  "(build them with LowRankLinear.from_linear)")
        if not conditioning >= 0:
            raise SpectrakitError(f"conditioning={conditioning!r} must be ≥ 0")
        self.gamma = float(conditioning)

    def forward(self) -> torch.Tensor:
        terms = [layer.orthonormality() + self.gamma * layer.conditioning() for layer in self.layers]
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()
