"""Randomized truncated SVD (Halko, Martinsson & Tropp, 2011).

Sketch the range with ``Y = W Ω`` for a Gaussian ``Ω`` of ``k + p`` columns
(``p`` = oversampling), sharpen it with ``q`` power iterations
``Y ← W (Wᵀ Y)`` (re-orthonormalised by QR each time), take ``Q = qr(Y)``, and
finish with the exact SVD of the small matrix ``B = Qᵀ W``:
``W ≈ (Q Û) Σ V̂ᵀ``. The error of σⱼ decays like ``(σ_{k+p+1}/σⱼ)^{2q+1}``.
"""

from __future__ import annotations

import torch

from ._prepare import transpose

DEFAULT_OVERSAMPLE = 10
DEFAULT_NITER = 4


def gaussian_sketch(shape: tuple[int, ...], like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded standard-normal matrix, drawn on the CPU so that the same seed gives
    the same sketch on every device."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    real = like.real.dtype if like.is_complex() else like.dtype
    omega = torch.randn(shape, generator=generator, dtype=torch.float64).to(real)
    return omega.to(device=like.device, dtype=like.dtype)


def randomized_svd(W: torch.Tensor, k: int, niter: int | None = None, oversample: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``W`` (batched over leading dimensions).

    >>> Q1 = torch.linalg.qr(torch.randn(500, 300, dtype=torch.float64)).Q
    >>> Q2 = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64)).Q
    >>> W = Q1 @ torch.diag(0.9 ** torch.arange(300, dtype=torch.float64)) @ Q2.T
    >>> U, S, Vh = randomized_svd(W, k=10, seed=0)
    >>> bool(torch.allclose(S, torch.linalg.svdvals(W)[:10], rtol=1e-6))
    True
    """
    niter = DEFAULT_NITER if niter is None else niter
    oversample = DEFAULT_OVERSAMPLE if oversample is None else oversample
    m, n = W.shape[-2], W.shape[-1]
    if m < n:  # sketch the smaller side: Wᵀ = V Σ Uᵀ
        V, S, Uh = randomized_svd(transpose(W), k, niter, oversample, seed)
        return transpose(Uh), S, transpose(V)
    width = min(n, k + oversample)
    omega = gaussian_sketch((*W.shape[:-2], n, width), W, seed)
    Q = torch.linalg.qr(W @ omega).Q
    Wt = transpose(W)
    for _ in range(niter):
        Q = torch.linalg.qr(Wt @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    U_small, S, Vh = torch.linalg.svd(transpose(Q) @ W, full_matrices=False)
    U = Q @ U_small
    return U[..., :k], S[..., :k], Vh[..., :k, :]
