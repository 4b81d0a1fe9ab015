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

``scale="frobenius"`` divides by ``‖W‖_F`` instead of the Gram bound, as the Muon
optimizer does: cheaper (no float64 products), at the price of smaller starting
singular values, which the quintic's steep slope at zero makes up for.
"""

from __future__ import annotations

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, transpose
from .norms import gram_iteration_bound

_MUON = (3.4445, -4.7750, 2.0315)


def orthogonalize(W: torch.Tensor, steps: int = 5, coefficients: str = "cubic", *,
                  dtype: torch.dtype | None = None, scale: str = "gram", eps: float = 1e-7,
                  check_finite: bool = True) -> torch.Tensor:
    """The (semi-)orthogonal polar factor ``U Vᵀ`` of ``W`` by Newton–Schulz, batched.

    Args:
        W: matrix or batch ``(..., m, n)``.
        steps: Newton–Schulz iterations.
        coefficients: ``"cubic"`` (converges to ``U Vᵀ``) or ``"muon"`` (the quintic).
        dtype: compute dtype (default: fp32 for fp16/bf16 input, else the input's);
            ``torch.bfloat16`` iterates in bf16, as Muon implementations do.
        scale: ``"gram"`` (divide by the Gram-iteration bound on σ₁) or ``"frobenius"``
            (divide by ``max(‖W‖_F, eps)``).
        eps: the floor of the Frobenius norm.
        check_finite: refuse NaN/Inf input (one reduction; callers that checked already skip it).

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
    if scale not in ("gram", "frobenius"):
        raise SpectrakitError(f"scale={scale!r} is not one of gram, frobenius")
    X = as_matrix(W, dtype, check_finite=check_finite)
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # iterate on the wide side, where X Xᵀ is the smaller Gram matrix (and the faster product)
        X = transpose(X)
    if scale == "gram":
        with torch.no_grad():
            bound = gram_iteration_bound(X.detach().double(), n_iter=4).to(X.dtype)
        X = X / bound.clamp_min(torch.finfo(X.dtype).tiny)[..., None, None]
    else:
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1)).clamp_min(eps)[..., None, None]
    fused = X.ndim == 2 and not (X.requires_grad and torch.is_grad_enabled())
    for _ in range(steps):
        gram = X @ transpose(X)
        if coefficients == "cubic":
            X = 1.5 * X - 0.5 * (gram @ X)
        elif fused:  # b·G + c·G², then a·X + (…)X, each one rounding, as in Muon's reference code
            a, b, c = _MUON
            X = torch.addmm(X, torch.addmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
        else:
            a, b, c = _MUON
            X = a * X + (b * gram + c * (gram @ gram)) @ X
    return transpose(X) if tall else X
