"""Block Krylov truncated SVD (Musco & Musco, *Randomized Block Krylov Methods for
Stronger and Faster Approximate Singular Value Decomposition*, NeurIPS 2015).

For ``W`` (``m × n``, ``n ≤ m``; a wide matrix is handled through ``Wᴴ``) and a Gaussian
start block ``Ω`` (``n × b``), the right Krylov space

    K = span[Ω, (WᴴW) Ω, (WᴴW)² Ω, …, (WᴴW)^q Ω]

is built block by block, each new block orthogonalized against the earlier ones, and
the top-``k`` triplets come from Rayleigh–Ritz on ``K``: with ``Q`` an orthonormal basis
of ``K`` and ``P = W Q``, ``PᴴP = E Λ Eᴴ`` gives ``σ = √λ``, ``V = Q E``, ``U = P E / σ``.

Why Krylov rather than plain power iterations: subspace iteration keeps only the last
block, ``(WᴴW)^q Ω``, and on a flat spectrum — a randomly initialized layer — it needs
many iterations to approach the optimal rank-``k`` approximation; the whole Krylov space
gets there with about the square root as many (gap-independent, ``Õ(1/√ε)``). Every
block reuses its product ``W X`` both to advance the iteration and in ``P``, so the whole
method costs ``q + 1`` products with ``W`` and ``q`` with ``Wᴴ``, each ``b`` columns wide.
"""

from __future__ import annotations

import torch

from ._prepare import transpose
from .gram import gram_svd
from .randomized import gaussian_sketch

DEFAULT_KRYLOV_ITERS = 5
# Rayleigh–Ritz on a basis that lost orthogonality (an exhausted Krylov space on a
# low-rank W) would overstate σ; above this deviation from QᴴQ = I the basis is rebuilt.
_ORTHOGONALITY_SLACK = {torch.float32: 1e-4, torch.complex64: 1e-4}


def krylov_blocks(n: int, k: int, niter: int | None = None, block: int | None = None) -> tuple[int, int]:
    """``(niter, block)`` for a top-``k`` problem whose smaller side is ``n``."""
    niter = DEFAULT_KRYLOV_ITERS if niter is None else int(niter)
    return niter, min(n, max(k, block or k))


def krylov_svd(W: torch.Tensor, k: int, niter: int | None = None, block: int | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``W`` (batched over leading dimensions).

    Args:
        k: number of triplets.
        niter: Krylov iterations ``q`` (default 5); the basis has ``(q + 1)·block`` columns.
        block: block width ``b`` (default ``k``).
        seed: seed of the Gaussian start block.

    >>> W = torch.randn(600, 300, dtype=torch.float64)
    >>> U, S, Vh = krylov_svd(W, k=8)
    >>> exact = torch.linalg.svdvals(W)
    >>> bool(((W - U @ torch.diag(S) @ Vh).norm() <= 1.001 * exact[8:].norm()))
    True
    """
    m, n = W.shape[-2], W.shape[-1]
    if m < n:
        V, S, Uh = krylov_svd(transpose(W), k, niter, block, seed)
        return transpose(Uh), S, transpose(V)
    niter, width = krylov_blocks(n, k, niter, block)
    if (niter + 1) * width >= n:  # the basis would span the whole space: solve it exactly
        return gram_svd(W, k)
    columns = (niter + 1) * width
    # The bases are kept transposed — Qt = Qᴴ (c × n) and Pt = (W Q)ᴴ (c × m) — so that each
    # new block is a contiguous run of rows, written in place.
    Qt = W.new_empty((*W.shape[:-2], columns, n))
    Pt = W.new_empty((*W.shape[:-2], columns, m))
    start = torch.linalg.qr(gaussian_sketch((*W.shape[:-2], n, width), W, seed)).Q
    Qt[..., :width, :] = transpose(start)
    torch.matmul(Qt[..., :width, :], transpose(W), out=Pt[..., :width, :])
    for step in range(1, niter + 1):
        done = step * width
        Zt = Pt[..., done - width:done, :] @ W  # (WᴴW X)ᴴ = (W X)ᴴ W
        basis = Qt[..., :done, :]
        # one projection pass; a basis that still drifts from orthogonality is caught below
        Zt = Zt - (Zt @ transpose(basis)) @ basis
        Qt[..., done:done + width, :] = transpose(torch.linalg.qr(transpose(Zt)).Q)
        torch.matmul(Qt[..., done:done + width, :], transpose(W), out=Pt[..., done:done + width, :])
    slack = _ORTHOGONALITY_SLACK.get(W.dtype, 1e-10)
    eye = torch.eye(columns, dtype=W.dtype, device=W.device)
    if float((Qt @ transpose(Qt) - eye).abs().amax()) > slack:
        Qt = transpose(torch.linalg.qr(transpose(Qt)).Q)
        Pt = Qt @ transpose(W)
    # Rayleigh–Ritz: P = W Q = U Σ Eᴴ (its Gram eigensolve), so W ≈ U Σ (Q E)ᴴ
    U, S, Eh = gram_svd(transpose(Pt), k)
    return U, S, Eh @ Qt
