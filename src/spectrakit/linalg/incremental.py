"""Incremental truncated SVD: grow a factorized matrix without refactorizing it.

Adding columns ``C`` to ``A ≈ U Σ Vᵀ`` (Brand, 2006): split ``C`` into its part in
span(U) and an orthonormal remainder ``P R = qr(C − U UᵀC)``; then

    [A  C] = [U  P] · K · blockdiag(V, I)ᵀ,   K = [[Σ, UᵀC], [0, R]],

so one SVD of the small ``(r + c) × (r + c)`` core ``K = Û Σ' V̂ᵀ`` gives
``U' = [U P] Û``, ``V' = blockdiag(V, I) V̂``. Truncating to ``k`` keeps the
cost independent of how many columns came before. Rows are added by transposition.

When only the right factor matters — e.g. the input-activation spectrum that EVA
needs, where rows are samples — :class:`IncrementalSVD` keeps just ``Σ, Vᵀ``: with
``A = U Σ Vᵀ``, the stacked matrix ``[A; B]`` has the same Gram matrix as
``[Σ Vᵀ; B]``, whose SVD is cheap.
"""

from __future__ import annotations

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, transpose


def _append_columns(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, C: torch.Tensor,
                    k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, c = S.shape[-1], C.shape[-1]
    projection = transpose(U) @ C
    P, R = torch.linalg.qr(C - U @ projection)
    top = torch.cat([torch.diag_embed(S).to(C.dtype), projection], dim=-1)
    bottom = torch.cat([torch.zeros(*R.shape[:-2], R.shape[-2], r, dtype=C.dtype, device=C.device), R], dim=-1)
    core_U, S_new, core_Vh = torch.linalg.svd(torch.cat([top, bottom], dim=-2), full_matrices=False)
    U_new = torch.cat([U, P], dim=-1) @ core_U
    n = Vh.shape[-1]
    V_block = torch.zeros(*Vh.shape[:-2], n + c, r + c, dtype=C.dtype, device=C.device)
    V_block[..., :n, :r] = transpose(Vh)
    V_block[..., n:, r:] = torch.eye(c, dtype=C.dtype, device=C.device)
    Vh_new = core_Vh @ transpose(V_block)
    keep = S_new.shape[-1] if k is None else min(k, S_new.shape[-1])
    return U_new[..., :keep], S_new[..., :keep], Vh_new[..., :keep, :]


def svd_update(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, columns: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, k: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ``A`` extended by new ``columns`` (``m × c``) or ``rows`` (``b × n``),
    from ``A ≈ U diag(S) Vh``, truncated to ``k`` (``None``: keep everything).

    Exact when ``U diag(S) Vh`` equals ``A``; otherwise the truncation error of the
    old factors carries over.

    >>> import spectrakit as sk
    >>> A, C = torch.randn(50, 20, dtype=torch.float64), torch.randn(50, 5, dtype=torch.float64)
    >>> U, S, Vh = sk.linalg.svd(A)
    >>> U2, S2, Vh2 = sk.linalg.svd_update(U, S, Vh, columns=C)
    >>> torch.allclose(S2, torch.linalg.svdvals(torch.cat([A, C], 1)))
    True
    """
    if columns is not None and rows is None:
        C = as_matrix(columns, U.dtype, name="columns")
        if C.shape[-2] != U.shape[-2]:
            raise SpectrakitError(f"columns: {C.shape[-2]} rows, but the factorized matrix has {U.shape[-2]}")
        return _append_columns(U, S, Vh, C, k)
    if rows is None or columns is not None:
        raise SpectrakitError("svd_update: pass exactly one of columns= or rows=")
    B = as_matrix(rows, U.dtype, name="rows")
    if B.shape[-1] != Vh.shape[-1]:
        raise SpectrakitError(f"rows: {B.shape[-1]} columns, but the factorized matrix has {Vh.shape[-1]}")
    V, S_new, Uh = _append_columns(transpose(Vh), S, transpose(U), transpose(B), k)
    return transpose(Uh), S_new, transpose(V)


class IncrementalSVD:
    """Top-``k`` right singular vectors and values of a matrix fed row block by row block.

    >>> import spectrakit as sk
    >>> X = torch.randn(1000, 64, dtype=torch.float64)
    >>> tracker = sk.linalg.IncrementalSVD(k=64)
    >>> for block in X.split(100):
    ...     _ = tracker.update(block)
    >>> torch.allclose(tracker.S, torch.linalg.svdvals(X))
    True
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise SpectrakitError(f"k={k} must be ≥ 1")
        self.k = k
        self.S: torch.Tensor | None = None
        self.Vh: torch.Tensor | None = None
        self.rows_seen = 0

    def update(self, rows: torch.Tensor) -> IncrementalSVD:
        """Fold a block of rows ``(b, n)`` (or ``(..., b, n)``) into the factorization."""
        dtype = None if self.Vh is None else self.Vh.dtype
        B = as_matrix(rows, dtype, name="rows")
        if self.S is not None and self.Vh is not None:
            if B.shape[-1] != self.Vh.shape[-1]:
                raise SpectrakitError(f"rows: {B.shape[-1]} columns, expected {self.Vh.shape[-1]}")
            B = torch.cat([self.S.unsqueeze(-1) * self.Vh, B], dim=-2)
        _, S, Vh = torch.linalg.svd(B, full_matrices=False)
        self.S, self.Vh = S[..., : self.k], Vh[..., : self.k, :]
        self.rows_seen += rows.shape[-2]
        return self
