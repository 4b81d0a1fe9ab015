"""Differentiable square root and inverse square root of a symmetric positive-definite matrix.

Two matrix-product forwards (no eigendecomposition), one backward:

``newton-schulz`` (coupled iteration; Higham, 2008, with the scaling of Chen & Chow, 2014).
    With ``c ≥ λ_max(A)`` (a certified Gram-iteration bound) and ``A_n = A / c``:

    .. math::  Y_0 = A_n,\\; Z_0 = I,\\quad M_k = Z_k Y_k,\\quad
               T_k = \\tfrac{α_k}{2}(3I - α_k^2 M_k),\\quad Y_{k+1} = Y_k T_k,\\; Z_{k+1} = T_k Z_k

    so ``Y_k → A_n^{1/2}``, ``Z_k → A_n^{-1/2}``; then ``√A = √c·Y``, ``A^{-1/2} = Z/√c``. Every
    iterate is a polynomial in ``A``, the eigenvalue ``s = √λ`` of the implicit sign iterate
    moving as ``s ← f(α s)``, ``f(x) = x(3 − x²)/2``. ``α_k = √(3 / (1 + a + a²))`` is the
    minimax scaling for a spectrum in ``[a, 1]`` (it maps both ends to the same value), with
    ``a`` tracked from a guessed lower end ``lower`` of ``λ(A_n)`` and from ``s² ≥ 1 − ‖M − I‖_F``:
    a wrong guess only costs steps, never convergence (``α ≤ √3`` keeps every ``α s`` in ``(0, √3)``). Three products
    per step; the loop stops after the step that brings ``0.375‖M − I‖²_F / √n`` (a bound on the
    RMS relative error of the root's eigenvalues) to ``tol``.

``pade`` (matrix Padé approximant; Song et al., *Fast Differentiable Matrix Square Root*, 2022).
    With ``Z = I − A_n``, ``√(I − Z) ≈ Q_m(Z)^{-1} P_m(Z)``, the ``[m/m]`` Padé approximant of
    ``√(1 − z)`` (coefficients from its Taylor series), and ``A_n^{-1/2} ≈ P_m(Z)^{-1} Q_m(Z)``:
    ``m − 1`` products and one linear solve. Accurate where ``λ(A_n)`` is not near 0; the error
    grows as ``((1 − √λ)/(1 + √λ))^{2m}`` for the smallest normalized eigenvalue ``λ``.

Backward (both): for ``S = √A`` the adjoint of ``dA = S dS + dS S`` is the Lyapunov equation
``S X + X S = Ḡ`` (``Ḡ`` the incoming gradient; ``A^{-1/2}``'s is first mapped to ``−T Ḡ T``),
solved by the coupled Newton–Schulz iteration for the sign of ``[[B, C], [0, −B]]``:
``B ← B(3I − B²)/2``, ``C ← (3C − B²C + BCB − CB²)/2`` from ``B = S/√c``, ``C = Ḡ/√c``, which
converges to ``[[I, 2X], [0, −I]]`` — products only again.

``method="eigh"`` is the reference: ``V diag(√λ) Vᵀ`` through ``torch.linalg.eigh`` (torch's own
backward). A matrix with eigenvalues at or below 0, or too ill-conditioned for the iteration to
reach ``tol`` in ``max_steps``, is refused with one line; shift it by ``εI`` or use ``"eigh"``.

>>> import torch, spectrakit as sk
>>> X = torch.randn(200, 32, dtype=torch.float64)
>>> A = X.T @ X / 200
>>> S = sk.linalg.sqrtm(A)
>>> torch.allclose(S @ S, A, atol=1e-10)
True
>>> torch.allclose(sk.linalg.inv_sqrtm(A) @ S, torch.eye(32, dtype=torch.float64), atol=1e-10)
True
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix
from .norms import gram_iteration_bound

SQRT_METHODS = ("newton-schulz", "pade", "eigh")
DEFAULT_LOWER = 1e-3
_MAX_STEPS = 60


def _identity_like(A: torch.Tensor) -> torch.Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)


def _check_square_symmetric(A: torch.Tensor, name: str, owner: str) -> torch.Tensor:
    A = as_matrix(A, name=name)
    if A.is_complex():
        raise SpectrakitError(f"{name}: {owner} takes a real symmetric matrix, got dtype {A.dtype}")
    if A.shape[-1] != A.shape[-2]:
        raise SpectrakitError(f"{name}: {owner} needs a square matrix, got shape {tuple(A.shape)}")
    with torch.no_grad():
        size = torch.linalg.matrix_norm(A, "fro").amax()
        asymmetry = torch.linalg.matrix_norm(A - A.mT, "fro").amax()
        if bool(asymmetry > math.sqrt(torch.finfo(A.dtype).eps) * size):
            raise SpectrakitError(f"{name}: {owner} needs a symmetric positive-definite matrix; "
                                  f"‖A − Aᵀ‖_F / ‖A‖_F = {float(asymmetry / size):.2e}")
        diagonal = A.diagonal(dim1=-2, dim2=-1)
        if bool((diagonal <= 0).any()):
            raise SpectrakitError(f"{name}: {owner} needs a positive-definite matrix, but a diagonal entry is "
                                  f"{float(diagonal.min()):.3g} (≤ 0)")
    return A


def _upper_bound(A: torch.Tensor) -> torch.Tensor:
    """A certified ``c ≥ λ_max(A)`` per matrix: two Gram iterations (≤ n^{1/8} above it)."""
    return gram_iteration_bound(A, n_iter=2)


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


def _residual(M: torch.Tensor, eye: torch.Tensor) -> float:
    """``‖M − I‖_F`` (the largest over a batch); it bounds every ``|λ(M) − 1|``."""
    return float(torch.linalg.matrix_norm(M - eye, "fro").amax())


def _last_step(residual: float, previous: float, tol: float, n: int) -> bool:
    """Whether the step just taken from ``‖M − I‖_F = residual`` reached ``tol``.

    From ``λ(M) = 1 − e`` a cubic step leaves ``1 − (3/4)e² + O(e³)``, and the root's relative
    error is half that, ``0.375 e²`` per eigenvalue; their RMS is at most
    ``0.375 · max|e| · RMS|e| ≤ 0.375 ‖M − I‖²_F / √n``. Also true once the residual stalls at
    the rounding floor (below 10⁻² it would otherwise square each step).
    """
    return 0.375 * residual * residual / math.sqrt(n) <= tol or (residual < 1e-2 and residual > 0.5 * previous)


def _not_converged(owner: str, name: str, steps: int, residual: float) -> SpectrakitError:
    what = "diverged" if not math.isfinite(residual) else f"did not converge (residual {residual:.2e})"
    return SpectrakitError(f"{name}: {owner} {what} in {steps} steps; the matrix is not positive definite "
                           "or too ill-conditioned: add εI or use method='eigh'")


def _newton_schulz(A_n: torch.Tensor, tol: float, max_steps: int, lower: float, name: str
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(A_n^{1/2}, A_n^{-1/2}, steps)`` by the scaled coupled iteration (``λ(A_n) ⊂ (0, 1]``)."""
    eye = _identity_like(A_n)
    Y, Z = A_n, eye
    a = math.sqrt(min(max(lower, 0.0), 1.0))  # guessed lower end of the sign iterate's spectrum
    residual = float("inf")
    for step in range(1, max_steps + 1):
        M = Z @ Y
        previous, residual = residual, _residual(M, eye)
        if not math.isfinite(residual):
            raise _not_converged("the Newton–Schulz square root", name, step, residual)
        # ‖M − I‖_F bounds the spectrum from below: λ(M) = s² ≥ 1 − residual
        a = max(a, math.sqrt(max(0.0, 1.0 - residual)))
        alpha = math.sqrt(3.0 / (1.0 + a + a * a)) if a < 1.0 - 1e-3 else 1.0
        T = (1.5 * alpha) * eye - (0.5 * alpha ** 3) * M
        Y, Z = Y @ T, T @ Z
        a = min(1.0, 0.5 * alpha * a * (3.0 - alpha * alpha * a * a))
        if alpha == 1.0 and _last_step(residual, previous, tol, A_n.shape[-1]):
            return Y, Z, step
    raise _not_converged("the Newton–Schulz square root", name, max_steps, residual)


@lru_cache(maxsize=32)
def _pade_coefficients(degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(p, q)``: the ``[m/m]`` Padé approximant ``P/Q`` of ``√(1 − z)`` (``q₀ = 1``)."""
    taylor = [1.0]
    for k in range(1, 2 * degree + 1):
        taylor.append(taylor[-1] * (k - 1.5) / k)
    t = torch.tensor(taylor, dtype=torch.float64)
    # Σ_j q_j t_{i−j} = 0 for i = m+1..2m with q_0 = 1
    system = torch.stack([torch.stack([t[i - j] for j in range(1, degree + 1)])
                          for i in range(degree + 1, 2 * degree + 1)])
    rhs = -t[degree + 1: 2 * degree + 1]
    q = torch.cat([torch.ones(1, dtype=torch.float64), torch.linalg.solve(system, rhs)])
    p = [float(sum(q[j] * t[i - j] for j in range(i + 1))) for i in range(degree + 1)]
    return tuple(p), tuple(float(v) for v in q)


def _pade(A_n: torch.Tensor, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_n^{1/2}, A_n^{-1/2})`` from the ``[m/m]`` Padé approximant in ``Z = I − A_n``."""
    eye = _identity_like(A_n)
    p, q = _pade_coefficients(degree)
    Z = eye - A_n
    power = eye
    P, Q = p[0] * eye, q[0] * eye
    for i in range(1, degree + 1):
        power = Z if i == 1 else power @ Z
        P, Q = P + p[i] * power, Q + q[i] * power
    # P and Q are polynomials in Z, so they commute: Q⁻¹P = P Q⁻¹
    return torch.linalg.solve(Q, P), torch.linalg.solve(P, Q)


def _lyapunov(S: torch.Tensor, G: torch.Tensor, scale: torch.Tensor, tol: float, max_steps: int,
              name: str) -> torch.Tensor:
    """``X`` with ``S X + X S = G`` for symmetric positive-definite ``S`` with ``λ_max(S) ≤ scale``."""
    eye = _identity_like(S)
    B, C = S / scale, G / scale
    residual = float("inf")
    for _ in range(max_steps):
        BB = B @ B
        previous, residual = residual, _residual(BB, eye)
        BC = B @ C
        C = 0.5 * (3 * C - B @ BC + BC @ B - (C @ B) @ B)
        B = 1.5 * B - 0.5 * (B @ BB)
        if _last_step(residual, previous, tol, S.shape[-1]):
            return 0.5 * C
    raise _not_converged("the square root's backward (Lyapunov) iteration", name, max_steps, residual)


class _Root(torch.autograd.Function):
    """Forward by products (``newton-schulz`` or ``pade``), backward by the Lyapunov iteration."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, inverse: bool, method: str, tol: float, max_steps: int,
                lower: float, degree: int, name: str) -> torch.Tensor:
        with torch.no_grad():
            c = _upper_bound(A)[..., None, None]
            A_n = A / c
            if method == "newton-schulz":
                root, inverse_root, _ = _newton_schulz(A_n, tol, max_steps, lower, name)
            else:
                root, inverse_root = _pade(A_n, degree)
            S, T = root * c.sqrt(), inverse_root / c.sqrt()
        ctx.save_for_backward(S, T, c)
        ctx.options = (inverse, tol, max_steps, name)
        return T if inverse else S

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        S, T, c = ctx.saved_tensors
        inverse, tol, max_steps, name = ctx.options
        G = -(T @ grad @ T) if inverse else grad
        grad_A = _lyapunov(S, G, c.sqrt(), tol, max_steps, name)
        return grad_A, None, None, None, None, None, None, None


def _eigh_root(A: torch.Tensor, inverse: bool, name: str) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(A)
    if bool((values.detach() <= 0).any()):
        raise SpectrakitError(f"{name}: the matrix square root needs a positive-definite matrix; its smallest "
                              f"eigenvalue is {float(values.detach().min()):.3g}")
    scaled = values.rsqrt() if inverse else values.sqrt()
    return (vectors * scaled.unsqueeze(-2)) @ vectors.mT


def _root(A: torch.Tensor, inverse: bool, method: str, steps: int | None, tol: float | None, lower: float,
          degree: int, name: str) -> torch.Tensor:
    owner = "inv_sqrtm" if inverse else "sqrtm"
    if method not in SQRT_METHODS:
        raise SpectrakitError(f"method={method!r} is not one of {', '.join(SQRT_METHODS)}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise SpectrakitError(f"steps={steps!r} must be a positive integer")
    if not isinstance(degree, int) or degree < 1:
        raise SpectrakitError(f"degree={degree!r} must be a positive integer")
    if not 0 < lower <= 1:
        raise SpectrakitError(f"lower={lower!r} must lie in (0, 1]")
    A = _check_square_symmetric(A, name, owner)
    if method == "eigh":
        return _eigh_root(A, inverse, name)
    tolerance = _default_tol(A.dtype) if tol is None else float(tol)
    if not tolerance > 0:
        raise SpectrakitError(f"tol={tol!r} must be positive")
    result = _Root.apply(A, inverse, method, tolerance, steps or _MAX_STEPS, lower, degree, name)
    return result


def sqrtm(A: torch.Tensor, method: str = "newton-schulz", *, steps: int | None = None, tol: float | None = None,
          lower: float = DEFAULT_LOWER, degree: int = 8, name: str = "A") -> torch.Tensor:
    """``A^{1/2}`` of a symmetric positive-definite ``A`` (``(..., n, n)``), differentiable.

    Args:
        A: the matrix (or batch); fp16/bf16 are computed in fp32.
        method: ``"newton-schulz"`` (default), ``"pade"`` or ``"eigh"`` (see the module docstring).
        steps: most Newton–Schulz steps, forward and backward (default 60); the iteration stops
            earlier, once its error bound is at most ``tol``.
        tol: the relative error the iteration aims at (default 1e-12 in float64, 1e-6
            otherwise), rounding permitting; a bound, so the result is usually better.
        lower: a guess of ``λ_min / λ_max``-ish (the lower end of the normalized spectrum) for
            the step scaling; it affects the number of steps only.
        degree: the Padé degree ``m`` for ``method="pade"``.
        name: what error messages call ``A``.
    """
    return _root(A, False, method, steps, tol, lower, degree, name)


def inv_sqrtm(A: torch.Tensor, method: str = "newton-schulz", *, steps: int | None = None, tol: float | None = None,
              lower: float = DEFAULT_LOWER, degree: int = 8, name: str = "A") -> torch.Tensor:
    """``A^{-1/2}`` of a symmetric positive-definite ``A``, differentiable; arguments as :func:`sqrtm`.

    Args:
        A, method, steps, tol, lower, degree, name: as for :func:`sqrtm`.
    """
    return _root(A, True, method, steps, tol, lower, degree, name)
