"""What every compression method shares: a transform, one SVD, truncation, the factors.

A method maps a weight ``W`` (``out × in``) to ``W̃ = L W R`` with ``L`` either a diagonal
(``left``, a vector, or ``None`` for the identity) or ``Cᵀ`` for a lower-triangular ``C``
(``left`` 2-D, as gfwsvd's row factor), and ``R`` either a diagonal (a vector) or a
lower-triangular matrix, both invertible; the squared singular values of
``W̃`` are the method's loss per dropped component. Truncating ``W̃ = U Σ Vᵀ`` to rank
``k`` gives the two factors of a :class:`LowRankLinear`:

.. math::  up = L^{-1} U_k \\Sigma_k^{1/2}, \\qquad down = \\Sigma_k^{1/2} V_k^T R^{-1}

so that ``up @ down = L⁻¹ (U_k Σ_k V_kᵀ) R⁻¹`` (√Σ is split between the factors to keep
them on the same scale). The SVD is computed once, by :mod:`spectrakit.linalg`
(:func:`~spectrakit.linalg.svd`, or :func:`~spectrakit.linalg.gram_eigh` on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import linalg
from ..cache import SpectrumCache
from .calibration import LayerStatistics


@dataclass
class Transform:
    """``W̃ = L · W · R`` with ``L = diag(left)`` (1-D) or ``leftᵀ`` (2-D, ``left`` lower
    triangular), and ``R = diag(right)`` (1-D) or ``right`` (2-D, lower triangular)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """``L W R`` (``W`` is ``out × in``)."""
        if self.left is not None:
            W = self.left[:, None] * W if self.left.ndim == 1 else self.left.mT @ W
        if self.right is not None:
            W = W * self.right[None, :] if self.right.ndim == 1 else W @ self.right
        return W


@dataclass
class Spectrum:
    """The SVD of one layer's transformed weight ``W̃ = L W R``, ready to be truncated.

    From a Gram eigensolve only one side's vectors are known (``U`` or ``Vh`` is ``None``);
    the other side's factor is formed for the kept columns only, straight from the layer's
    own ``weight`` (no copy of ``W̃`` is kept): with ``W̃ᵀ U_k = V_k Σ_k`` and
    ``W̃ V_k = U_k Σ_k``, the transform cancels on that side,

    .. math::  U_k Σ_k V_k^T = U_k (L U_k)^T W R = W (R V_k) V_k^T

    and each kept component is then scaled so that its column of ``up`` and row of ``down``
    have equal norms. That needs no ``σᵢ``, so a component whose ``σᵢ`` rounded to zero is
    kept exactly as well.
    """

    S: torch.Tensor
    transform: Transform
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    # form the missing side in float64 (the method has a transform, which may be ill-conditioned)
    precise: bool = False

    @property
    def losses(self) -> torch.Tensor:
        """``σᵢ²``: the method's loss for dropping component ``i`` (float64)."""
        return self.S.double().square()

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` of the rank-``rank`` truncation, mapped back through the transform."""
        left, right = self.transform.left, self.transform.right
        if self.U is not None and self.Vh is not None:  # a full SVD: √Σ goes to each side
            root = self.S[:rank].sqrt()
            up = self.U[:, :rank] * root[None, :].to(self.U.dtype)
            down = root[:, None].to(self.Vh.dtype) * self.Vh[:rank]
        elif self.U is not None:  # U_k · (Lᵀ U_k)ᵀ W, and L⁻¹ below
            assert self.weight is not None
            work = torch.float64 if self.precise else self.U.dtype
            up = self.U[:, :rank].to(work)
            if left is None:
                scaled = up
            else:  # Lᵀ U_k: L = Cᵀ gives C U_k
                scaled = left[:, None].to(work) * up if left.ndim == 1 else left.to(work) @ up
            down = scaled.mT @ self.weight.to(work)
        else:  # W (R V_k) · V_kᵀ, and R⁻¹ below
            assert self.Vh is not None and self.weight is not None
            work = torch.float64 if self.precise else self.Vh.dtype
            down = self.Vh[:rank].to(work)
            V = down.mT
            if right is not None:
                V = right[:, None].to(work) * V if right.ndim == 1 else right.to(work) @ V
            up = self.weight.to(work) @ V
        if self.U is not None and left is not None:
            if left.ndim == 1:
                up = up / left[:, None].to(up.dtype)
            else:  # L⁻¹ · up = C⁻ᵀ up by a triangular solve, in float64
                up = torch.linalg.solve_triangular(left.mT.double(), up.double(), upper=True)
        if self.Vh is not None and right is not None:
            if right.ndim == 1:
                down = down / right[None, :].to(down.dtype)
            else:  # down · R⁻¹ by a triangular solve (x R = down), in float64
                down = torch.linalg.solve_triangular(right, down.double(), upper=False, left=False)
        if self.U is None or self.Vh is None:
            up, down = balance(up, down)
        return up.to(dtype), down.to(dtype)


def balance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each component (column of ``up``, row of ``down``) to equal norms on both
    sides; ``up @ down`` is unchanged."""
    up_norms, down_norms = up.norm(dim=0), down.norm(dim=1).to(up.dtype)
    scale = torch.where((up_norms > 0) & (down_norms > 0), (down_norms / up_norms).sqrt(), torch.ones_like(up_norms))
    return up * scale[None, :], down / scale[:, None].to(down.dtype)


class Method:
    """A compression method: the statistics it needs and the transform it applies.

    Subclasses set ``name`` and ``needs`` (a subset of ``{"gram", "scale", "fisher",
    "kronecker"}``) and implement :meth:`transform`.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    default_allocation: ClassVar[str] = "uniform"  # what allocation=None means for this method
    #: a spectrum cache, set by ``compress(cache=)``; only methods whose spectrum depends on the
    #: weight alone (plain svd) read it
    cache: SpectrumCache | None = None

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        raise NotImplementedError

    def warnings(self) -> list[str]:
        """Messages for the caller once every layer is transformed (e.g. damping applied)."""
        return []

    def uses_output_gram(self, W: torch.Tensor, svd_method: str = "auto") -> bool:
        """Whether :meth:`spectrum` takes this layer's output second moment
        (``LayerStatistics.output_gram``) instead of the statistics in ``needs``."""
        return False

    def spectrum(self, name: str, W: torch.Tensor, stats: LayerStatistics | None,
                 svd_method: str = "auto") -> Spectrum:
        """Transform ``W`` (canonical ``out × in``) and take its thin SVD.

        With ``svd_method="auto"`` on the CPU, a single-precision ``W̃`` is formed in float64
        and decomposed through the eigensolve of its smaller Gram matrix: that resolves σ
        down to about 1e-8·σ₁ (as finely as a float32 SVD does, and better than one where the
        transform is ill-conditioned, as SVD-LLM's Cholesky factor may be: cond up to 1e10)
        and costs 1.2–3× less than float32 LAPACK SVD (more for rectangular weights). The
        smaller side's singular vectors are then kept in float32 until ranks are chosen, and
        the other side's factor is formed from the layer's weight for the kept columns only
        (see :class:`Spectrum`). A float64 weight keeps the exact float64 SVD; elsewhere the
        SVD runs in the weight's precision (float32 for half).
        """
        compute = torch.float64 if W.dtype == torch.float64 else torch.float32
        stored = compute  # the precision U and Vh are kept in until the ranks are chosen
        if svd_method == "auto" and W.device.type == "cpu" and compute != torch.float64:
            compute, svd_method = torch.float64, "gram"
        transform = self.transform(name, W, stats)
        transform = Transform(*(None if t is None else t.to(W.device) for t in (transform.left, transform.right)))
        Wt = Transform(*(None if t is None else t.to(compute) for t in (transform.left, transform.right))
                       ).apply(W.to(compute))
        if svd_method == "gram":  # one side's vectors now, the other for the kept columns later
            S, vectors, tall = linalg.gram_eigh(Wt)
            vectors = vectors.to(stored)
            precise = transform.left is not None or transform.right is not None
            # only the known side's part of the transform is used again (svd-llm's in × in
            # factor is not kept for a wide layer)
            kept = Transform(right=transform.right) if tall else Transform(left=transform.left)
            return Spectrum(S, kept, U=None if tall else vectors, Vh=vectors.mT if tall else None, weight=W,
                            precise=precise)
        U, S, Vh = linalg.svd(Wt, method=svd_method)
        return Spectrum(S, transform, U=U.to(stored), Vh=Vh.to(stored))


def positive_floor(values: torch.Tensor, relative: float = 1e-6) -> torch.Tensor:
    """``values`` with entries below ``relative · max`` raised to it, so a dead channel
    (all-zero activation, zero Fisher) cannot make a diagonal scaling singular."""
    values = values.double()
    top = float(values.max()) if values.numel() else 0.0
    floor = relative * top if top > 0 else 1.0
    return values.clamp_min(floor)


class CompressionWarning(UserWarning):
    """A compression step had to deviate from its formula (e.g. SVD-LLM damping)."""
