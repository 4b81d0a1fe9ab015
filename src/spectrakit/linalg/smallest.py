"""The smallest singular value ``σ_min`` to a stated relative accuracy, or a verdict that it is unresolved.

A spectrum computed in precision ``ε`` only resolves singular values well above its rounding
floor. For ``W`` of shape ``m × n`` and ``r = σ/σ₁``, with ``c = max(m, n) / 4`` (measured on
matrices of sides 256 to 2048 with ``r`` from 1e-1 to 1e-7, geometric and flat spectra, the
error stayed below this bound by 11× or more for the float64 Gram route, 60× for the float32
Gram route and 100× for the float32 SVD):

* through the Gram matrix ``WᵀW`` (``eigvalsh``), ``|Δλ| ≲ c·ε·λ₁``, so
  ``|Δσ|/σ ≲ c·ε / (2r²)``: accurate to ``rtol`` for ``r ≥ √(c·ε / (2·rtol))`` —
  in float32 and ``rtol = 1 %`` about 2e-2 for a side of 256: the float32 Gram cannot
  resolve the small end of most trained matrices;
* through an SVD (``svdvals``), ``|Δσ| ≲ c·ε·σ₁``: accurate for ``r ≥ c·ε / rtol``.

:func:`resolution_floor` gives that ``r`` for a method and dtype; :func:`smallest_singular_value`
computes ``σ_min`` in float64 when a spectrum's own value lies below its floor:

1. the float64 Gram matrix ``G = WᵀW`` of the smaller side; up to a side of 512, simply its
   ``eigvalsh`` (one LAPACK call, cheaper there than any iteration); beyond, its Cholesky
   factor ``G = LLᵀ`` and
2. inverse subspace iteration ``X ← orth(G⁻¹X)`` on a block of 16 vectors, with Rayleigh–Ritz
   ``θ = λ_min(XᵀGX)``, until the residual ``‖Gx − θx‖ ≤ θ·rtol/10`` (each step is two
   triangular solves and one product with ``G``; at most 60 steps);
3. ``σ_min = √θ`` when it is above the float64 Gram floor (≈ 3.4e-6·σ₁ for a side of 4096);
   otherwise (or when the Cholesky factorization fails) the exact float64 SVD, which resolves
   ``r ≥ c·ε₆₄/rtol`` (≈ 2.3e-11 for a side of 4096); below that, ``σ_min`` is unresolved
   (``value=None``): the matrix is numerically rank-deficient, and no finite precision says
   how far.

Steps 1–2 cost a float64 product and a Cholesky factorization, about a third of a float64
``eigvalsh``, for large sides. Everything is deterministic (a seeded start block).

>>> import torch
>>> U, _ = torch.linalg.qr(torch.randn(300, 200, dtype=torch.float64))
>>> V, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
>>> W = ((U * torch.logspace(0, -5, 200, dtype=torch.float64)) @ V.T).float()
>>> truth = float(torch.linalg.svdvals(W.double())[-1])
>>> result = smallest_singular_value(W)
>>> result.method, abs(result.value / truth - 1) < 1e-3
('float64-gram', True)
>>> resolution_floor((300, 200), torch.float32, "gram") > 1e-5   # the float32 Gram cannot
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, transpose
from .gram import gram
from .svd import _DOUBLE, _check_method, choose_method

DEFAULT_RTOL = 0.01
_BLOCK = 16
_EIGVALSH_SIDE = 512  # up to this side, eigvalsh of the float64 Gram matrix beats the iteration
# the rounding-error bounds use c = max(m, n) / _SAFETY_DIVISOR (see the module docstring)
_SAFETY_DIVISOR = 4
# each step costs about 3·n²·16 flops, so 60 steps stay near the cost of the Cholesky
# factorization (n³/3) for n in the thousands; a slower start falls back to the exact SVD
_MAX_STEPS = 60


@dataclass(frozen=True)
class SmallestSingularValue:
    """The result of :func:`smallest_singular_value`.

    Attributes:
        value: ``σ_min``, or ``None`` when it is below float64 resolution.
        method: ``"spectrum"`` (the given spectrum's own value), ``"float64-gram"``,
            ``"float64-svd"`` or ``"unresolved"``.
        bound: when unresolved, an upper bound on ``σ_min`` (the resolution limit); else ``None``.
    """

    value: float | None
    method: str
    bound: float | None = None

    @property
    def resolved(self) -> bool:
        """Whether ``value`` holds ``σ_min`` to the requested accuracy."""
        return self.value is not None


def resolution_floor(shape: tuple[int, ...], dtype: torch.dtype, method: str = "auto",
                     rtol: float = DEFAULT_RTOL) -> float:
    """The smallest ``σ/σ₁`` that :func:`spectrakit.linalg.svdvals` resolves to ``rtol``.

    Args:
        shape: the matrix's shape (``(..., m, n)``).
        dtype: the dtype the spectrum is computed in (fp16/bf16 compute in float32).
        method: the ``svdvals`` method (``"auto"`` resolves as ``svdvals`` does; ``"randomized"``
            and ``"krylov"`` give 1: their small end is never trusted).
        rtol: the relative accuracy asked of ``σ``.
    """
    _check_method(method)
    size = max(shape[-2], shape[-1]) / _SAFETY_DIVISOR
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if method == "auto":
        method = choose_method(tuple(shape), None, want_vectors=False)
        if method == "exact" and dtype in _DOUBLE:  # svdvals forms a float64 Gram matrix instead
            method, dtype = "gram", _DOUBLE[dtype]
    eps = torch.finfo(dtype).eps
    if method == "gram":
        return min(1.0, math.sqrt(size * eps / (2 * rtol)))
    if method == "exact":
        return min(1.0, size * eps / rtol)
    return 1.0


def _gram_floor(size: float, rtol: float) -> float:
    return math.sqrt(size * torch.finfo(torch.float64).eps / (2 * rtol))


def _svd_floor(size: float, rtol: float) -> float:
    return size * torch.finfo(torch.float64).eps / rtol


def _inverse_subspace_iteration(G: torch.Tensor, L: torch.Tensor, rtol: float, seed: int) -> float | None:
    """``λ_min(G)`` from the Cholesky factor ``L`` of ``G``, to within ``rtol/10`` by its residual
    (some eigenvalue lies within ``‖Gx − θx‖`` of the Ritz value ``θ``, and ``θ ≥ λ_min``);
    ``None`` when it does not get there in ``_MAX_STEPS`` steps."""
    n = G.shape[-1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n, min(n, _BLOCK), generator=generator, dtype=torch.float64).to(device=G.device, dtype=G.dtype)
    for _ in range(_MAX_STEPS):
        X, _ = torch.linalg.qr(torch.cholesky_solve(X, L))
        GX = G @ X
        thetas, vectors = torch.linalg.eigh(transpose(X) @ GX)
        theta = float(thetas[0])
        if not theta > 0:
            return None
        residual = float(torch.linalg.vector_norm(GX @ vectors[:, :1] - theta * (X @ vectors[:, :1])))
        if residual <= 0.1 * rtol * theta:
            return theta
    return None


def _largest_eigenvalue(G: torch.Tensor, steps: int = 30) -> float:
    """``λ₁(G)`` by power iteration (a lower bound, close after a few steps; the floors need
    no more than that)."""
    v = torch.ones(G.shape[-1], 1, dtype=G.dtype, device=G.device)
    value = 0.0
    for _ in range(steps):
        w = G @ v
        value = float(torch.linalg.vector_norm(w))
        if value == 0:
            return 0.0
        v = w / value
    return value


def smallest_singular_value(W: torch.Tensor, spectrum: torch.Tensor | None = None, *, method: str = "auto",
                            dtype: torch.dtype | None = None, rtol: float = DEFAULT_RTOL,
                            seed: int = 0) -> SmallestSingularValue:
    """``σ_min`` of the matrix ``W`` to relative accuracy ``rtol``, or a verdict that it is unresolved.

    Args:
        W: a matrix (``m × n``, any float or complex dtype; it is read in float64).
        spectrum: ``W``'s singular values (descending) as already computed with ``method`` in
            ``W``'s dtype, if any: its last value is returned as is when it lies above that
            method's :func:`resolution_floor`, and its first one is taken as ``σ₁``.
        method: the ``svdvals`` method that produced ``spectrum``.
        dtype: the dtype ``spectrum`` was computed in (default: ``W``'s compute dtype, as in
            ``svdvals``).
        rtol: the relative accuracy asked of ``σ_min``.
        seed: the start block of the inverse iteration.

    Returns:
        A :class:`SmallestSingularValue` (``value``, ``method``, ``bound``).
    """
    W = as_matrix(W, dtype, check_finite=False)
    if W.ndim != 2:
        raise SpectrakitError(f"W: expected one matrix, got shape {tuple(W.shape)}")
    size = max(W.shape) / _SAFETY_DIVISOR
    if spectrum is not None and spectrum.numel() and float(spectrum[0]) > 0:
        floor = resolution_floor(tuple(W.shape), W.dtype, method, rtol)
        if float(spectrum[-1]) >= floor * float(spectrum[0]):
            return SmallestSingularValue(float(spectrum[-1]), "spectrum")
    W64 = W.to(torch.complex128 if W.is_complex() else torch.float64)
    tall = W64.shape[0] >= W64.shape[1]
    G = gram(W64 if tall else transpose(W64))
    largest = None if spectrum is None else float(spectrum[0])
    if G.shape[-1] <= _EIGVALSH_SIDE:
        eigenvalues = torch.linalg.eigvalsh(G)
        theta: float | None = float(eigenvalues[0])
        largest = largest or math.sqrt(max(0.0, float(eigenvalues[-1])))
    else:
        L, info = torch.linalg.cholesky_ex(G)
        theta = _inverse_subspace_iteration(G, L, rtol, seed) if int(info) == 0 else None
        largest = largest or math.sqrt(_largest_eigenvalue(G))
    if theta is not None and theta > 0 and math.sqrt(theta) >= _gram_floor(size, rtol) * largest:
        return SmallestSingularValue(math.sqrt(theta), "float64-gram")
    values = torch.linalg.svdvals(W64)
    largest = float(values[0])
    if float(values[-1]) >= _svd_floor(size, rtol) * largest:
        return SmallestSingularValue(float(values[-1]), "float64-svd")
    return SmallestSingularValue(None, "unresolved", bound=_svd_floor(size, rtol) * largest)
