"""GFWSVD: generalized Fisher-weighted SVD with a Kronecker-factored Fisher (2025; seed 002).

The empirical Fisher of a layer's weight, ``F = Σ_b vec(G_b) vec(G_b)ᵀ`` over the
per-batch weight gradients ``G_b = ∂L_b/∂W`` (``out × in``), is approximated by a
Kronecker product of a column (input-side) and a row (output-side) factor,

.. math::  A = \\textstyle\\sum_b G_b G_b^T, \\quad B = \\sum_b G_b^T G_b, \\quad
           F \\approx \\frac{B \\otimes A}{\\sum_b \\lVert G_b \\rVert_F^2}

(the first alternating step of the nearest-Kronecker-product problem from ``B = I``, scaled
so that both sides have the same trace). Under that metric a weight change costs
``tr(ΔWᵀ A ΔW B) / s``: with Cholesky factors ``A = C_A C_Aᵀ``, ``B/s = C_B C_Bᵀ``, it is
``‖C_Aᵀ ΔW C_B‖²_F``. So ``W`` is whitened on both sides, truncated and unwhitened:

.. math::  C_A^T W C_B = U \\Sigma V^T, \\qquad
           W' = C_A^{-T} U_k \\Sigma_k V_k^T C_B^{-1}

and the Fisher-metric loss of the truncation is exactly the dropped ``Σ_{i>k} σᵢ²``.

Only the products of the whitened weight's smaller side are needed, so a rectangular layer
never factors its larger Fisher factor. A tall ``W = QR`` (``out > in``) gives
``C_Bᵀ Wᵀ A W C_B = (R C_B)ᵀ (Qᵀ A Q) (R C_B)`` (``in × in``), whose eigenvectors are ``V``:
``A`` enters only through ``Qᵀ A Q`` and needs no Cholesky factor (nor a ridge); a wide one
does the same on the other side with ``Wᵀ = QR`` and ``Qᵀ B Q``. Square layers take both
Cholesky factors.

FWSVD is the row-only special case: ``factors="row-diagonal"`` keeps only the diagonal
of ``A`` (FWSVD's ``dᵢ² = Σ_b Σ_j G_bij²``) and takes ``B = I``, which is FWSVD's transform.
A singular factor (fewer gradient directions than rows or columns: few calibration
tokens, dead channels) gets a ridge ``damping · mean(diag)`` as in svd-llm, with one
:class:`~spectrakit.compress.CompressionWarning`. A targeted layer that receives no
gradient from the loss is an error here (FWSVD falls back to plain SVD): its Fisher is zero.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
>>> batches = [torch.randn(32, 16) for _ in range(8)]
>>> loss = lambda model, x: model(x).square().mean()
>>> report = sk.compress(model, method="gfwsvd", rank=2, calibration=batches, loss_fn=loss)
>>> report.layers["2"].rank
2
"""

from __future__ import annotations

import torch

from .. import linalg
from ..errors import SpectrakitError
from .base import Method, Spectrum, Transform, positive_floor
from .calibration import LayerStatistics
from .svd_llm import whitening_factor

FACTORS = ("kronecker", "row-diagonal")


def fisher_factors(stats: LayerStatistics, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, s)``: the row and column Fisher factors and ``s = Σ_b ‖G_b‖²_F``, checked.

    Args:
        stats: a layer's statistics with ``row_fisher`` (``A``) and ``column_fisher`` (``B``).
        name: the layer, for messages.
    """
    row, column = stats.row_fisher, stats.column_fisher
    if row is None or column is None or not float(row.diagonal().sum()) > 0:
        raise SpectrakitError(f"gfwsvd: layer {name} received no gradient from the loss on the calibration data, "
                              "so its Kronecker Fisher cannot be formed (is it used in the loss?)")
    return row.double(), column.double(), float(row.diagonal().sum())


def kronecker_whitening(stats: LayerStatistics, name: str = "layer", damping: float = 1e-2,
                        max_condition: float = 1e10) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Lower-triangular ``(C_A, C_B)`` with ``C_A C_Aᵀ = A + λI`` and ``C_B C_Bᵀ = (B + λ'I) / s``
    (float64), and why a ridge was needed ("" if none). See the module docstring.

    Args:
        stats: a layer's statistics with ``row_fisher`` (``A``) and ``column_fisher`` (``B``).
        name: the layer, for messages.
        damping, max_condition: the ridge rule of :func:`~spectrakit.compress.svd_llm.whitening_factor`.
    """
    row, column, total = fisher_factors(stats, name)
    # the number of gradient samples limits the factors' rank, not the token count: pass the
    # size so whitening_factor judges the factor by its conditioning alone
    row_factor, row_ridge, row_reason = whitening_factor(row, row.shape[0], name, damping, max_condition)
    column_factor, column_ridge, column_reason = whitening_factor(column / total, column.shape[0], name, damping,
                                                                  max_condition)
    reasons = [f"{side} factor: {why.replace('input second moment', 'Fisher factor')}"
               for side, why in (("row", row_reason), ("column", column_reason)) if why]
    return row_factor, column_factor, "; ".join(reasons)


class GeneralizedFisherWeightedSVD(Method):
    name = "gfwsvd"
    needs = frozenset({"kronecker"})

    def __init__(self, factors: str = "kronecker", damping: float = 1e-2, max_condition: float = 1e10) -> None:
        if factors not in FACTORS:
            raise SpectrakitError(f"gfwsvd: factors={factors!r} is not one of {', '.join(FACTORS)}")
        if not damping > 0 or not max_condition > 1:
            raise SpectrakitError(f"gfwsvd: damping={damping!r} must be > 0 and max_condition={max_condition!r} > 1")
        self.factors = factors
        self.damping = float(damping)
        self.max_condition = float(max_condition)
        self.damped: dict[str, str] = {}
        self.count = 0

    def transform(self, name: str, W: torch.Tensor, stats: LayerStatistics | None) -> Transform:
        assert stats is not None
        self.count += 1
        if self.factors == "row-diagonal":  # FWSVD: diag(A)^½ on the rows, B = I
            if stats.fisher is None or not float(stats.fisher.sum()) > 0:
                raise SpectrakitError(f"gfwsvd: layer {name} received no gradient from the loss on the calibration "
                                      "data, so its Fisher cannot be formed (is it used in the loss?)")
            return Transform(left=positive_floor(stats.fisher.sqrt()))
        row, column, reason = kronecker_whitening(stats, name, self.damping, self.max_condition)
        if reason:
            self.damped[name] = reason
        return Transform(left=row, right=column)

    def spectrum(self, name: str, W: torch.Tensor, stats: LayerStatistics | None,
                 svd_method: str = "auto") -> Spectrum:
        """A rectangular layer through its smaller side (the module docstring); square layers,
        ``factors="row-diagonal"`` and an explicit ``svd_method`` as every method does."""
        out_features, in_features = W.shape
        if self.factors != "kronecker" or svd_method != "auto" or out_features == in_features:
            return super().spectrum(name, W, stats, svd_method)
        assert stats is not None
        self.count += 1
        row, column, total = fisher_factors(stats, name)
        weight = W.to(torch.float64)
        stored = torch.float64 if W.dtype == torch.float64 else torch.float32
        tall = out_features > in_features
        fisher, other = (row, column / total) if tall else (column / total, row)
        factor, _, reason = whitening_factor(other.to(W.device), other.shape[0], name, self.damping,
                                             self.max_condition)
        if reason:
            side = "column" if tall else "row"
            self.damped[name] = f"{side} factor: {reason.replace('input second moment', 'Fisher factor')}"
        Q, R = torch.linalg.qr(weight if tall else weight.mT)  # W = QR (tall) or Wᵀ = QR (wide)
        projected = Q.mT @ fisher.to(W.device) @ Q  # Qᵀ A Q or Qᵀ (B/s) Q, min × min
        whitened = R @ factor if tall else factor.mT @ R.mT  # R C_B, or C_Aᵀ Rᵀ
        inner = whitened.mT @ projected @ whitened if tall else whitened @ projected @ whitened.mT
        S, vectors = linalg.gram_spectrum(inner)
        if tall:  # V of C_Aᵀ W C_B: W' = W C_B V_k V_kᵀ C_B⁻¹
            return Spectrum(S, Transform(right=factor), Vh=vectors.mT.to(stored), weight=W, precise=True)
        return Spectrum(S, Transform(left=factor), U=vectors.to(stored), weight=W, precise=True)

    def warnings(self) -> list[str]:
        if not self.damped:
            return []
        examples = "; ".join(f"{name}: {why}" for name, why in list(self.damped.items())[:3])
        more = f"; and {len(self.damped) - 3} more" if len(self.damped) > 3 else ""
        return [f"gfwsvd damped the Kronecker Fisher factors of {len(self.damped)} of {self.count} layers "
                f"({examples}{more}); more calibration batches (gradient samples) is the real fix"]
