"""Sparsity-aware incremental truncated SVD: append sparse columns without touching a dense ``m × k`` basis.

Brand's update (:func:`spectrakit.linalg.svd_update`) forms the dense remainder
``C − U UᵀC`` of new columns ``C`` (``m × c``) and rotates the dense ``m × k`` basis ``U`` at
every step, ``O(m·k·(k + c))`` however sparse ``C`` is. Following Deng et al. (*Fast Updating
Truncated SVD for Representation Learning with Sparse Matrices*, ICLR 2024), the left basis is
kept in an *extended* form instead,

    U = [U₀  C₁  C₂  …  C_t] · M,

a dense start ``U₀`` and the sparse blocks seen so far, times a small coefficient matrix ``M``.
An update only multiplies sparse blocks and small matrices:

    P = UᵀC = Mᵀ [U₀ᵀC; C₁ᵀC; …],     EᵀE = CᵀC − PᵀP     (E = C − UP, never formed),
    EᵀE = W Λ Wᵀ,  R = Λ^{1/2} Wᵀ,  R⁺ = W Λ^{-1/2}     (directions with Λ ≈ 0 dropped),
    K = [[diag S, P], [0, R]] = Û S' V̂ᵀ,
    M' = [[M, −M P R⁺], [0, R⁺]] · Û,    V' = blockdiag(V, I) · V̂.

``Q = E R⁺`` is orthonormal (``QᵀQ = R⁺ᵀ EᵀE R⁺ = I``), so this is Brand's update exactly, in
another basis. ``U`` is formed only when read (:attr:`U`) or on :meth:`compact`, which folds
the blocks into a new dense ``U₀`` (the cost of the projections grows with the number of
stored blocks, so compact now and then in long streams). Accuracy: ``EᵀE`` is a Gram
matrix, so a remainder ``E`` much smaller than ``C`` (new columns almost inside ``span U``)
loses relative accuracy as ``ε‖C‖²/‖E‖²``, as in CholeskyQR; directions below ``√ε·‖C‖``
are dropped.

>>> import torch, spectrakit as sk
>>> A = torch.randn(200, 30, dtype=torch.float64)
>>> tracker = sk.linalg.SparseIncrementalSVD.from_matrix(A, k=60)
>>> C = torch.randn(200, 20, dtype=torch.float64) * (torch.rand(200, 20) < 0.05)
>>> _ = tracker.update(C.to_sparse())
>>> torch.allclose(tracker.S, torch.linalg.svdvals(torch.cat([A, C], 1)))
True
"""

from __future__ import annotations

import warnings

import torch

from ..errors import SpectrakitError
from .svd import svd


def _as_sparse_columns(C: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(C, torch.Tensor):
        raise SpectrakitError(f"columns: expected a torch.Tensor, got {type(C).__name__}")
    if C.ndim != 2:
        raise SpectrakitError(f"columns: expected an (m, c) matrix, got shape {tuple(C.shape)}")
    if C.shape[0] != rows:
        raise SpectrakitError(f"columns: {C.shape[0]} rows, but the factorized matrix has {rows}")
    if not C.dtype.is_floating_point:
        raise SpectrakitError(f"columns: dtype {C.dtype} is not floating point")
    sparse = C.to_sparse() if C.layout == torch.strided else C.to_sparse_coo()
    sparse = sparse.coalesce().to(dtype)
    if not bool(torch.isfinite(sparse.values()).all()):
        raise SpectrakitError("columns: contains NaN or Inf values")
    return sparse


class SparseIncrementalSVD:
    """Top-``k`` SVD of a matrix grown by (sparse) column blocks, its left basis kept in extended form.

    Args:
        U, S, Vh: the current thin SVD ``A ≈ U diag(S) Vh`` (dense).
        k: how many singular triplets to keep after each update.
    """

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SpectrakitError(f"k={k!r} must be a positive integer")
        if U.ndim != 2 or Vh.ndim != 2 or S.ndim != 1 or U.shape[1] != S.shape[0] or Vh.shape[0] != S.shape[0]:
            raise SpectrakitError(f"U, S, Vh: shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} "
                                  "are not a thin SVD")
        self.k = k
        self.base = U
        self.blocks: list[torch.Tensor] = []
        self.M = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
        self.S, self.V = S.to(U.dtype), Vh.mT.to(U.dtype)

    @classmethod
    def from_matrix(cls, A: torch.Tensor, k: int) -> SparseIncrementalSVD:
        """Start from the SVD of a dense ``A`` (:func:`spectrakit.linalg.svd`), keeping ``k``.

        Args:
            A: the starting matrix ``(m, n)``.
            k: how many triplets to keep.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SpectrakitError(f"k={k!r} must be a positive integer")
        U, S, Vh = svd(A, method="exact")
        keep = min(k, S.shape[0])
        return cls(U[:, :keep], S[:keep], Vh[:keep], k)

    @property
    def Vh(self) -> torch.Tensor:
        """The right singular vectors, ``(k, n)``."""
        return self.V.mT

    @property
    def U(self) -> torch.Tensor:
        """The left singular vectors ``[U₀ C₁ …] M``, formed now (``m × k``)."""
        return self._basis_times(self.M)

    def _basis_times(self, coefficients: torch.Tensor) -> torch.Tensor:
        r = self.base.shape[1]
        out = self.base @ coefficients[:r]
        for block in self.blocks:
            c = block.shape[1]
            out = out + torch.sparse.mm(block, coefficients[r:r + c])
            r += c
        return out

    def _basis_transpose_times(self, C: torch.Tensor) -> torch.Tensor:
        """``[U₀ C₁ …]ᵀ C`` for a sparse ``C``: sparse products only."""
        parts = [torch.sparse.mm(C.t(), self.base).mT]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            parts += [torch.sparse.mm(block.t(), C).to_dense() for block in self.blocks]
        return torch.cat(parts, dim=0)

    def update(self, columns: torch.Tensor) -> SparseIncrementalSVD:
        """Append ``columns`` (``m × c``, sparse or dense) to the factorized matrix.

        Args:
            columns: the new columns; a dense tensor is converted to a sparse one.
        """
        C = _as_sparse_columns(columns, self.base.shape[0], self.base.dtype)
        r, c = self.S.shape[0], C.shape[1]
        P = self.M.mT @ self._basis_transpose_times(C)                  # UᵀC, r × c
        with warnings.catch_warnings():  # torch hands the sparse product back in its beta CSR layout
            warnings.simplefilter("ignore", UserWarning)
            remainder_gram = torch.sparse.mm(C.t(), C).to_dense() - P.mT @ P  # EᵀE
        values, W = torch.linalg.eigh(0.5 * (remainder_gram + remainder_gram.mT))
        floor = torch.finfo(values.dtype).eps ** 0.5 * max(float(values.abs().max()), float(self.S.max()) ** 2, 1e-300)
        keep = values > floor
        W, root = W[:, keep], values[keep].sqrt()
        R = root[:, None] * W.mT                                          # p × c
        R_pinv = W / root                                                 # c × p
        p = R.shape[0]
        core = torch.zeros(r + p, r + c, dtype=P.dtype, device=P.device)
        core[:r, :r] = torch.diag(self.S)
        core[:r, r:] = P
        core[r:, r:] = R
        core_U, S_new, core_Vh = torch.linalg.svd(core, full_matrices=False)
        size = self.M.shape[0]
        M_ext = torch.zeros(size + c, r + p, dtype=P.dtype, device=P.device)
        M_ext[:size, :r] = self.M
        M_ext[:size, r:] = -self.M @ (P @ R_pinv)
        M_ext[size:, r:] = R_pinv
        n = self.V.shape[0]
        V_ext = torch.zeros(n + c, r + c, dtype=P.dtype, device=P.device)
        V_ext[:n, :r] = self.V
        V_ext[n:, r:] = torch.eye(c, dtype=P.dtype, device=P.device)
        keep_k = min(self.k, S_new.shape[0])
        self.blocks.append(C)
        self.M = M_ext @ core_U[:, :keep_k]
        self.S = S_new[:keep_k]
        self.V = V_ext @ core_Vh[:keep_k].mT
        return self

    def compact(self) -> SparseIncrementalSVD:
        """Fold the stored sparse blocks into a new dense ``U₀ = U`` (``M = I``)."""
        self.base = self.U
        self.blocks = []
        self.M = torch.eye(self.base.shape[1], dtype=self.base.dtype, device=self.base.device)
        return self
