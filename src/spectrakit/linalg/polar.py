"""Newton–Schulz iteration for the orthogonal polar factor.

For ``W = U Σ Vᵀ`` the polar factor is ``Q = U Vᵀ``, the nearest semi-orthogonal
matrix to ``W``. The cubic Newton–Schulz iteration

    X₀ = W / β,   X_{k+1} = 1.5·X_k − 0.5·X_k X_kᵀ X_k,

maps every singular value ``s ∈ (0, √3)`` toward 1 (quadratically near 1) using only
matrix products, so it runs well on accelerators and is differentiable. ``β`` is
the Gram-iteration upper bound on σ₁, which puts every ``s`` in ``(0, 1]``.
Convergence speed depends on the conditioning: a singular value ``s ≪ 1`` first
grows by ×1.5 per step, so ``steps=5`` is accurate to ~1e-6 for ``σ_min/σ₁ ≳ 0.5``;
use more steps for ill-conditioned matrices.

``coefficients="muon"`` switches to the quintic ``(3.4445, −4.7750, 2.0315)``
of the Muon optimizer: it pushes small singular values up much faster but
leaves them only roughly in ``[0.7, 1.2]`` — an orthogonalized *update*, not an
exact polar factor.
"""

from __future__ import annotations

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, transpose
from .norms import gram_iteration_bound

_MUON = (3.4445, -4.7750, 2.0315)


def orthogonalize(W: torch.Tensor, steps: int = 5, coefficients: str = "cubic", *,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (semi-)orthogonal polar factor ``U Vᵀ`` of ``W`` by Newton–Schulz, batched.

    >>> import spectrakit as sk
    >>> W = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, dtype=torch.float64)
    >>> Q = sk.linalg.orthogonalize(W, steps=8)
    >>> torch.allclose(Q.T @ Q, torch.eye(16, dtype=torch.float64), atol=1e-8)
    True
    """
    if coefficients not in ("cubic", "muon"):
        raise SpectrakitError(f"coefficients={coefficients!r} is not one of cubic, muon")
    if steps < 0:
        raise SpectrakitError(f"steps={steps} must be ≥ 0")
    X = as_matrix(W, dtype)
    wide = X.shape[-2] < X.shape[-1]
    if wide:  # iterate on the side with the smaller Gram matrix
        X = transpose(X)
    with torch.no_grad():
        scale = gram_iteration_bound(X.detach().double(), n_iter=4).to(X.dtype)
    X = X / scale.clamp_min(torch.finfo(X.dtype).tiny)[..., None, None]
    for _ in range(steps):
        gram = transpose(X) @ X
        if coefficients == "cubic":
            X = 1.5 * X - 0.5 * (X @ gram)
        else:
            a, b, c = _MUON
            X = a * X + X @ (b * gram + c * (gram @ gram))
    return transpose(X) if wide else X
