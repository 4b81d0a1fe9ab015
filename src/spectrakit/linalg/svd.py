"""Singular values and thin/top-k SVD with one entry point and several methods.

Methods
-------
``exact``       LAPACK/cuSOLVER SVD (``torch.linalg.svd``); the reference.
``gram``        ``eigvalsh``/``eigh`` of the smaller Gram matrix; the fastest way to a
                full spectrum, accurate to about ``ε·σ₁`` (see :mod:`.gram`).
``randomized``  Gaussian sketch + power iterations; for the top ``k ≪ min(m, n)``.
``krylov``      block Krylov space + Rayleigh–Ritz; top ``k`` near the optimal rank-``k``
                approximation even on flat spectra (see :mod:`.krylov`).
``auto``        picks one by shape and ``k`` (rules in :func:`choose_method`).

Every method works on batches ``(..., m, n)``, on any device, computes fp16/bf16
inputs in fp32 (or in ``dtype`` when given, e.g. ``torch.float64``) and returns
singular values in descending order.
"""

from __future__ import annotations

import torch

from ..errors import NonFiniteError, SpectrakitError
from ._prepare import all_finite, as_matrix, check_rank
from .gram import gram_svd, gram_svdvals
from .krylov import krylov_svd
from .randomized import randomized_svd

METHODS = ("auto", "exact", "gram", "randomized", "krylov")

# Below this smaller side an exact SVD costs little, so auto keeps full accuracy.
_SMALL_SIDE = 128
# Randomized only pays off when k is a small fraction of the smaller side.
_RANDOMIZED_FRACTION = 0.125
_RANDOMIZED_MIN_SIDE = 256


def choose_method(shape: tuple[int, ...], k: int | None, want_vectors: bool) -> str:
    """The method ``auto`` resolves to for a matrix of ``shape`` and rank ``k``.

    * top-``k`` with ``k ≤ min(m, n)/8`` on a side of at least 256: ``randomized``;
    * a full spectrum (values only) of a matrix whose smaller side exceeds 128: ``gram``;
    * everything else, including all full factorizations: ``exact`` — except that
      :func:`svdvals` of a small single-precision matrix forms its Gram matrix in double
      precision instead (see :data:`_DOUBLE`).

    Args:
        shape: the matrix's shape (leading batch dimensions allowed).
        k: the number of triplets wanted, or ``None`` for the full spectrum.
        want_vectors: whether singular vectors are needed (``svd``) or values only (``svdvals``).
    """
    small = min(shape[-2], shape[-1])
    if k is not None and small >= _RANDOMIZED_MIN_SIDE and k <= _RANDOMIZED_FRACTION * small:
        return "randomized"
    if not want_vectors and small > _SMALL_SIDE:
        return "gram"
    return "exact"


# A Gram matrix formed in double precision resolves σ down to about 1e-8·σ₁ — as finely as
# a single-precision SVD does — and on small matrices costs a third of that SVD or less.
_DOUBLE = {torch.float32: torch.float64, torch.complex64: torch.complex128}


def _check_finite_unless_gram(W: torch.Tensor, method: str) -> None:
    """Reject NaN/Inf up front, except for ``gram``, which checks its Gram matrix's
    diagonal instead (a full pass over ``W`` costs up to a sixth of a Gram spectrum)."""
    if method != "gram" and not all_finite(W):
        raise NonFiniteError("W: contains NaN or Inf values")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise SpectrakitError(f"method={method!r} is not one of {', '.join(METHODS)}")
    return method


def svdvals(W: torch.Tensor, k: int | None = None, method: str = "auto", *,
            dtype: torch.dtype | None = None, niter: int | None = None, seed: int = 0) -> torch.Tensor:
    """Singular values of ``W`` (shape ``(..., m, n)``), largest first.

    Args:
        W: a matrix or a batch of matrices.
        k: return only the ``k`` largest (``None``: all ``min(m, n)``).
        method: ``"auto"``, ``"exact"``, ``"gram"``, ``"randomized"`` or ``"krylov"``.
        dtype: compute dtype; default fp32 for half-precision input, else ``W``'s.
        niter, seed: power (Krylov) iterations and seed of the randomized (Krylov) method.

    >>> import spectrakit as sk
    >>> W = torch.randn(512, 256)
    >>> sk.linalg.svdvals(W).shape
    torch.Size([256])
    >>> sk.linalg.svdvals(W, k=8, method="randomized").shape
    torch.Size([8])
    """
    _check_method(method)
    W = as_matrix(W, dtype, check_finite=False)
    k_eff = check_rank(k, W)
    if method == "auto":
        method = choose_method(tuple(W.shape), k, want_vectors=False)
        if method == "exact" and W.dtype in _DOUBLE:
            return gram_svdvals(W.to(_DOUBLE[W.dtype])).to(W.dtype)[..., :k_eff]
    _check_finite_unless_gram(W, method)
    if method == "randomized":
        return randomized_svd(W, k_eff, niter=niter, seed=seed)[1]
    if method == "krylov":
        return krylov_svd(W, k_eff, niter=niter, seed=seed)[1]
    if method == "gram":
        values = gram_svdvals(W)
    else:
        values = torch.linalg.svdvals(W)
    return values[..., :k_eff]


def svd(W: torch.Tensor, k: int | None = None, method: str = "auto", niter: int | None = None,
        seed: int = 0, *, dtype: torch.dtype | None = None,
        oversample: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin (or top-``k``) SVD ``W ≈ U diag(S) Vh`` with ``S`` descending.

    Shapes: ``U (..., m, r)``, ``S (..., r)``, ``Vh (..., r, n)`` with
    ``r = k or min(m, n)``. The same ``seed`` always gives the same result.

    Args:
        W: the matrix (leading batch dimensions allowed).
        k: the number of leading triplets, or ``None`` for the thin SVD.
        method: ``auto``, ``exact``, ``gram``, ``randomized`` or ``krylov`` (see :func:`choose_method`).
        niter: power (randomized) or block (krylov) iterations; ``None`` picks the method's default.
        seed: seed of the random sketch of the randomized methods.
        dtype: the dtype to compute in (default: float32 for half precision, else the input's).
        oversample: extra sketch columns of the randomized methods (default: the method's).

    >>> import spectrakit as sk
    >>> W = torch.randn(64, 32, dtype=torch.float64)
    >>> U, S, Vh = sk.linalg.svd(W)
    >>> torch.allclose(U @ torch.diag(S) @ Vh, W)
    True
    """
    _check_method(method)
    W = as_matrix(W, dtype, check_finite=False)
    k_eff = check_rank(k, W)
    if method == "auto":
        method = choose_method(tuple(W.shape), k, want_vectors=True)
    _check_finite_unless_gram(W, method)
    if method == "randomized":
        return randomized_svd(W, k_eff, niter=niter, oversample=oversample, seed=seed)
    if method == "krylov":
        return krylov_svd(W, k_eff, niter=niter, block=k_eff + (oversample or 0), seed=seed)
    if method == "gram":
        return gram_svd(W, k_eff)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[..., :k_eff], S[..., :k_eff], Vh[..., :k_eff, :]
