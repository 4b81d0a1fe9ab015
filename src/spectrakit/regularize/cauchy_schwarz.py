"""Cauchy–Schwarz regularizers: scale-adaptive penalties that vanish on scaled orthogonal matrices,
on discrete-valued weights (:class:`CauchySchwarzDiscrete`) and on eigenvectors (:class:`CauchySchwarzEigenvector`).

For the smaller Gram matrix ``G`` (``n × n``) of a weight ``W``, Cauchy–Schwarz for the
Frobenius inner product of ``G`` and ``I`` gives ``(tr G)² = ⟨G, I⟩² ≤ ‖G‖²_F ‖I‖²_F``, so

    R(W) = n · ‖G‖²_F − (tr G)²  ≥ 0,

with equality exactly when ``G = c·I`` — the columns (rows, for a wide ``W``) are orthogonal
with one common norm, *whatever that norm is* (Taner, Wang & Studer, *Cauchy–Schwarz
Regularizers*, 2025). Unlike ``‖G − I‖²_F`` it does not fix the scale: the layer keeps the
magnitude it learns. ``R = Σ_{i<j} (λ_i − λ_j)²`` over ``G``'s eigenvalues, so it measures the
spread of the squared singular values. ``normalized=True`` divides by ``(tr G)²``, giving
the scale-invariant ``n·‖G‖²_F/(tr G)² − 1`` in ``[0, n − 1]``.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(5, 5, bias=False, dtype=torch.float64)
>>> with torch.no_grad():
...     _ = layer.weight.copy_(3.0 * torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0])   # orthogonal × 3
>>> abs(sk.regularize.CauchySchwarzOrthogonality(layer)().item()) < 1e-9
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import Patterns, Penalty, Target
from .orthogonality import smaller_gram


class CauchySchwarzOrthogonality(Penalty):
    """``Σ_l n_l‖G_l‖²_F − (tr G_l)²`` (divided by ``(tr G_l)²`` when ``normalized``)."""

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], *, normalized: bool = False,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.normalized = normalized

    def term(self, target: Target, index: int) -> torch.Tensor:
        G = smaller_gram(target.matrix())
        trace = G.diagonal().sum()
        gap = G.shape[0] * G.square().sum() - trace.square()
        if self.normalized:
            gap = gap / trace.square().clamp_min(torch.finfo(G.dtype).tiny)
        return gap


DISCRETE_SETS = ("binary", "one-sided", "ternary")


def discrete_gap(x: torch.Tensor, values: str) -> torch.Tensor:
    """The Cauchy–Schwarz gap ``‖g‖²‖h‖² − ⟨g, h⟩²`` of each row of ``x`` for the ``values`` set.

    ``binary`` ``{−α, α}``: ``g = x², h = 1`` → ``N‖x‖₄⁴ − ‖x‖₂⁴``;
    ``one-sided`` ``{0, α}``: ``g = x, h = x²`` → ``‖x‖₂²‖x‖₄⁴ − (Σx³)²``;
    ``ternary`` ``{−α, 0, α}``: ``g = x, h = x³`` → ``‖x‖₂²‖x‖₆⁶ − ‖x‖₄⁸``.
    """
    squares = x.square()
    if values == "binary":
        return x.shape[-1] * squares.square().sum(-1) - squares.sum(-1).square()
    if values == "one-sided":
        return squares.sum(-1) * squares.square().sum(-1) - (squares * x).sum(-1).square()
    return squares.sum(-1) * (squares * squares * squares).sum(-1) - squares.square().sum(-1).square()


class CauchySchwarzDiscrete(Penalty):
    """Cauchy–Schwarz discrete-value regularizer: each output neuron's weights pulled onto ``{±α}``,
    ``{0, α}`` or ``{−α, 0, α}`` with the scale ``α`` left free (Taner, Wang & Studer, 2025).

    For vectors ``g(x), h(x)`` Cauchy–Schwarz gives ``⟨g, h⟩² ≤ ‖g‖²‖h‖²``, with equality exactly
    when ``g ∥ h``; choosing them so that parallel means "discrete" gives (per row ``x ∈ ℝᴺ``):

    =============  ================  ==========================================  ======================
    ``values``     set               ``ℓ(x)``                                    zero exactly when
    =============  ================  ==========================================  ======================
    ``binary``     ``{−α, +α}``      ``N‖x‖₄⁴ − ‖x‖₂⁴``   (``g = x∘x, h = 1``)    every ``|x_i|`` equal
    ``one-sided``  ``{0, α}``        ``‖x‖₂²‖x‖₄⁴ − ⟨x, x∘x⟩²``                  ``x_i² = α x_i``
    ``ternary``    ``{−α, 0, α}``    ``‖x‖₂²‖x‖₆⁶ − ‖x‖₄⁸``   (``g = x, h = x³``) ``x_i³ = α² x_i``
    =============  ================  ==========================================  ======================

    Rows are output neurons (``per="row"``, one scale per neuron, as for per-channel weight
    quantization) or the whole flattened tensor (``per="tensor"``). ``normalized=True``
    divides each gap by ``‖g‖²‖h‖²``, giving a scale-invariant value in ``[0, 1]``.

    >>> import torch, spectrakit as sk
    >>> W = 0.3 * torch.sign(torch.randn(4, 16, dtype=torch.float64))     # binary rows, α = 0.3
    >>> float(sk.regularize.CauchySchwarzDiscrete([W], values="binary")()) < 1e-12
    True

    Args:
        source: a model, a dict of tensors or a list of tensors.
        values: ``"binary"``, ``"one-sided"`` or ``"ternary"``.
        per: ``"row"`` (each output neuron its own ``α``) or ``"tensor"`` (one ``α``).
        normalized: divide each gap by ``‖g‖²‖h‖²``.
        include, exclude, kinds, reduction: see :class:`~spectrakit.regularize.SpectralPenalty`.
    """

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], values: str = "binary", *,
                 per: str = "row", normalized: bool = False, include: Patterns = None, exclude: Patterns = None,
                 kinds: str | Iterable[str] | None = None, reduction: str = "sum") -> None:
        if values not in DISCRETE_SETS:
            raise SpectrakitError(f"values={values!r} is not one of {', '.join(DISCRETE_SETS)}")
        if per not in ("row", "tensor"):
            raise SpectrakitError(f"per={per!r} is not one of row, tensor")
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.values, self.per, self.normalized = values, per, normalized

    def term(self, target: Target, index: int) -> torch.Tensor:
        W = target.matrix()
        rows = W.reshape(1, -1) if self.per == "tensor" else W
        gap = discrete_gap(rows, self.values)
        if self.normalized:
            gap = gap / (gap + _discrete_product(rows, self.values)).clamp_min(torch.finfo(W.dtype).tiny)
        return gap.sum()


def _discrete_product(x: torch.Tensor, values: str) -> torch.Tensor:
    """``⟨g, h⟩²`` of :func:`discrete_gap` (so ``gap + product = ‖g‖²‖h‖²``)."""
    squares = x.square()
    if values == "binary":
        return squares.sum(-1).square()
    if values == "one-sided":
        return (squares * x).sum(-1).square()
    return squares.square().sum(-1).square()


class CauchySchwarzEigenvector(nn.Module):
    """Cauchy–Schwarz eigenvector regularizer: ``ℓ(x) = ‖x‖²‖Cx‖² − (xᵀCx)²`` for a fixed ``C``.

    Cauchy–Schwarz for ``x`` and ``Cx``: zero exactly when ``Cx ∥ x`` — ``x`` is an eigenvector
    of ``C`` (or zero), whatever its length (Taner, Wang & Studer, 2025). ``forward(X)`` takes a
    vector ``(n,)`` or a batch of them as the columns of ``X`` (``n × p``) and returns the sum
    of their gaps; ``normalized=True`` divides each by ``‖x‖²‖Cx‖²`` (the ``sin²`` of the
    angle between ``x`` and ``Cx``).

    >>> import torch, spectrakit as sk
    >>> C = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    >>> reg = sk.regularize.CauchySchwarzEigenvector(C)
    >>> float(reg(torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64)))
    0.0

    Args:
        C: the square matrix whose eigenvectors are promoted.
        normalized: divide each gap by ``‖x‖²‖Cx‖²``.
    """

    C: torch.Tensor

    def __init__(self, C: torch.Tensor, *, normalized: bool = False) -> None:
        super().__init__()
        if not isinstance(C, torch.Tensor) or C.ndim != 2 or C.shape[0] != C.shape[1]:
            shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
            raise SpectrakitError(f"C: CauchySchwarzEigenvector needs a square matrix, got {shape}")
        if not C.dtype.is_floating_point or not bool(torch.isfinite(C).all()):
            raise SpectrakitError("C: must be a finite floating-point matrix")
        self.register_buffer("C", C)
        self.normalized = normalized

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not isinstance(X, torch.Tensor) or X.ndim not in (1, 2) or X.shape[0] != self.C.shape[0]:
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
            raise SpectrakitError(f"x: expected a vector of length {self.C.shape[0]} or a matrix with that many "
                                  f"rows, got {shape}")
        columns = X.unsqueeze(-1) if X.ndim == 1 else X
        image = self.C.to(columns.dtype) @ columns
        bound = columns.square().sum(0) * image.square().sum(0)
        gap = bound - (columns * image).sum(0).square()
        if self.normalized:
            gap = gap / bound.clamp_min(torch.finfo(bound.dtype).tiny)
        return gap.sum()
