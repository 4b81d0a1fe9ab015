"""Frobenius-nearest points of spectral sets: nuclear, spectral and Ky Fan balls, rank-k matrices, the PSD cone.

Each set is unitarily invariant, so (von Neumann) the nearest point to ``W = U diag(σ) Vᵀ`` is
``U diag(x) Vᵀ`` with ``x`` the nearest point of the matching set of vectors to ``σ``:

=========================  ======================================  =========================================
function                   set                                     ``x`` from ``σ`` (descending, ≥ 0)
=========================  ======================================  =========================================
``project_nuclear_ball``   ``‖X‖_* = Σσ ≤ r``                      ``max(σ − θ, 0)``, ``θ`` the simplex shift
                                                                    making ``Σx = r`` (Duchi et al., 2008)
``project_spectral_ball``  ``‖X‖₂ = σ₁ ≤ r``                       ``min(σ, r)``
``project_ky_fan_ball``    ``‖X‖_(k) = σ₁ + … + σ_k ≤ r``          the prox of ``μ·(top-k sum)`` at ``σ``, ``μ``
                                                                    found by bisection so that the top-k sum
                                                                    of ``x`` is ``r`` (below)
``project_rank``           ``rank X ≤ k`` (not convex)             the top ``k`` of ``σ`` (Eckart–Young)
``project_psd``            ``X = Xᵀ ⪰ 0``                          ``max(λ, 0)`` of the symmetric part ``(W + Wᵀ)/2``
                                                                    (Higham, 1988), by ``eigh``
=========================  ======================================  =========================================

Ky Fan: the prox of ``μ·Σ_{top k}`` at ``σ`` is ``x_i = σ_i − clip(σ_i − t, 0, μ)``, the
threshold ``t`` solving ``Σ_i clip(σ_i − t, 0, μ) = kμ`` — the largest values come down by
``μ``, those near ``t`` meet at ``t`` — or soft thresholding ``max(σ − μ, 0)`` when that ``t``
would be ≤ 0 (fewer than ``k`` values survive, the top-k sum is then the ℓ₁ norm). The top-k
sum of ``x`` falls continuously with ``μ``; both ``t`` and ``μ`` are bisected in float64.
(``k = 1`` is the spectral ball, ``k = min(m, n)`` the nuclear ball.)

The SVD is :func:`spectrakit.linalg.svd` (``method="exact"``); matrices already inside a ball
come back unchanged. Batches ``(..., m, n)`` are supported.

>>> import torch, spectrakit as sk
>>> W = torch.randn(6, 4, dtype=torch.float64)
>>> X = sk.linalg.project_nuclear_ball(W, radius=1.0)
>>> round(float(torch.linalg.matrix_norm(X, "nuc")), 8)
1.0
>>> X = sk.linalg.project_ky_fan_ball(W, k=2, radius=1.0)
>>> round(float(torch.linalg.svdvals(X)[:2].sum()), 8)
1.0
"""

from __future__ import annotations

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, check_rank
from .svd import svd

_BISECTIONS = 100


def _check_radius(radius: float, owner: str) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0 or radius == float("inf"):
        raise SpectrakitError(f"radius={radius!r}: {owner} needs a finite radius > 0")
    return float(radius)


def _with_values(U: torch.Tensor, values: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    return (U * values.to(U.dtype).unsqueeze(-2)) @ Vh


def _simplex_shift(S: torch.Tensor, radius: float) -> torch.Tensor:
    """``max(S − θ, 0)`` with ``Σ = radius`` for descending ``S ≥ 0`` whose sum exceeds it."""
    cumulative = S.cumsum(-1)
    ranks = torch.arange(1, S.shape[-1] + 1, dtype=S.dtype, device=S.device)
    shifts = (cumulative - radius) / ranks
    support = (S > shifts).sum(-1, keepdim=True).clamp_min(1)  # S_j > θ_j holds for a prefix
    theta = shifts.gather(-1, support - 1)
    return (S - theta).clamp_min(0)


def project_nuclear_ball(W: torch.Tensor, radius: float) -> torch.Tensor:
    """The nearest ``X`` (Frobenius) with nuclear norm ``Σσ(X) ≤ radius``.

    Args:
        W: a matrix or batch ``(..., m, n)``.
        radius: the ball's radius, > 0.
    """
    r = _check_radius(radius, "project_nuclear_ball")
    W = as_matrix(W)
    U, S, Vh = svd(W, method="exact")
    inside = S.sum(-1, keepdim=True) <= r
    projected = torch.where(inside, S, _simplex_shift(S, r))
    return torch.where(inside.unsqueeze(-1), W, _with_values(U, projected, Vh))


def project_spectral_ball(W: torch.Tensor, radius: float) -> torch.Tensor:
    """The nearest ``X`` (Frobenius) with spectral norm ``σ₁(X) ≤ radius``: singular values clipped.

    Args:
        W: a matrix or batch ``(..., m, n)``.
        radius: the ball's radius, > 0.
    """
    r = _check_radius(radius, "project_spectral_ball")
    W = as_matrix(W)
    U, S, Vh = svd(W, method="exact")
    return _with_values(U, S.clamp_max(r), Vh)


def project_rank(W: torch.Tensor, k: int) -> torch.Tensor:
    """The nearest ``X`` (Frobenius) of rank at most ``k``: the truncated SVD (Eckart–Young).

    Args:
        W: a matrix or batch ``(..., m, n)``.
        k: the rank, in ``1..min(m, n)``.
    """
    W = as_matrix(W)
    check_rank(k, W)
    U, S, Vh = svd(W, method="exact")
    return _with_values(U[..., :k], S[..., :k], Vh[..., :k, :])


def project_psd(A: torch.Tensor) -> torch.Tensor:
    """The nearest symmetric positive-semidefinite matrix (Frobenius) to a square ``A``.

    Args:
        A: a square matrix or batch ``(..., n, n)``; only its symmetric part matters.
    """
    A = as_matrix(A, name="A")
    if A.shape[-1] != A.shape[-2]:
        raise SpectrakitError(f"A: project_psd needs a square matrix, got shape {tuple(A.shape)}")
    symmetric = 0.5 * (A + A.mT.conj())
    values, vectors = torch.linalg.eigh(symmetric)
    return _with_values(vectors, values.clamp_min(0), vectors.mT.conj())


def _top_k_prox(S: torch.Tensor, k: int, mu: torch.Tensor) -> torch.Tensor:
    """``argmin_x ½‖x − S‖² + μ·(sum of the k largest |x_i|)`` for ``S ≥ 0`` (per row, ``μ`` ``(..., 1)``)."""
    soft = (S - mu).clamp_min(0)
    if k >= S.shape[-1]:
        return soft
    soft_case = torch.minimum(S, mu).sum(-1, keepdim=True) <= k * mu
    low, high = S.amin(-1, keepdim=True) - mu, S.amax(-1, keepdim=True)
    for _ in range(_BISECTIONS):
        t = 0.5 * (low + high)
        above = (S - t).clamp(min=0).minimum(mu).sum(-1, keepdim=True) > k * mu
        low, high = torch.where(above, t, low), torch.where(above, high, t)
    t = 0.5 * (low + high)
    shifted = S - (S - t).clamp(min=0).minimum(mu)
    return torch.where(soft_case, soft, shifted)


def project_ky_fan_ball(W: torch.Tensor, k: int, radius: float) -> torch.Tensor:
    """The nearest ``X`` (Frobenius) whose ``k`` largest singular values sum to at most ``radius``.

    Args:
        W: a matrix or batch ``(..., m, n)``.
        k: how many singular values the Ky Fan norm sums, in ``1..min(m, n)``.
        radius: the ball's radius, > 0.
    """
    r = _check_radius(radius, "project_ky_fan_ball")
    W = as_matrix(W)
    check_rank(k, W)
    U, S, Vh = svd(W, method="exact")
    S64 = S.double()
    top = S64[..., :k].sum(-1, keepdim=True)
    inside = top <= r
    low, high = torch.zeros_like(top), S64.sum(-1, keepdim=True)  # μ = Σσ shrinks everything to 0
    for _ in range(_BISECTIONS):
        mu = 0.5 * (low + high)
        too_big = _top_k_prox(S64, k, mu).topk(k, dim=-1).values.sum(-1, keepdim=True) > r
        low, high = torch.where(too_big, mu, low), torch.where(too_big, high, mu)
    projected = _top_k_prox(S64, k, 0.5 * (low + high)).to(S.dtype)
    return torch.where(inside.unsqueeze(-1), W, _with_values(U, projected, Vh))
