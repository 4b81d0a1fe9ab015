"""Lanczos with full reorthogonalization, for a symmetric operator known only by products.

From a unit start ``q₁``, ``m`` steps build an orthonormal basis ``Q = [q₁ … q_m]`` of the
Krylov space and the tridiagonal ``T = QᵀAQ`` (diagonal ``α``, off-diagonal ``β``):

    w = A qⱼ − βⱼ₋₁ qⱼ₋₁,   αⱼ = ⟨w, qⱼ⟩,   w ← w − αⱼ qⱼ,
    w ← w − Q (Qᵀ w)  (twice: full reorthogonalization),   βⱼ = ‖w‖,   qⱼ₊₁ = w / βⱼ.

The eigenpairs ``T sᵢ = θᵢ sᵢ`` give Ritz pairs ``(θᵢ, Q sᵢ)``, and ``‖A Q sᵢ − θᵢ Q sᵢ‖ =
β_m |s_{m,i}|`` is each one's residual, known without another product. When ``β`` vanishes
the space is invariant; the iteration goes on from a fresh random vector orthogonal to
``Q`` (with ``β = 0`` in ``T``), so repeated and separated eigenvalues are still found.

Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) reads a spectral density off the
same ``T``: for a unit probe ``q₁``, ``Σᵢ τᵢ δ(λ − θᵢ)`` with ``τᵢ = s₁ᵢ²`` is the Gauss
quadrature of ``q₁ᵀ δ(λ − A) q₁``, whose average over random probes is the density.

>>> import torch
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> values, _, _ = top_eigenpairs(lambda v: A @ v, 100, 3, tol=1e-10, dtype=torch.float64)
>>> [round(float(x), 6) for x in values]
[100.0, 99.0, 98.0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import SpectrakitError

MatVec = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("LA", "LM", "SA")


@dataclass
class LanczosState:
    """The basis (rows of ``basis``), the tridiagonal ``T`` and the pending residual of a run."""

    basis: torch.Tensor    # (m, n)
    alpha: torch.Tensor    # (m,)
    beta: torch.Tensor     # (m,): beta[j] links q_j and q_{j+1}; beta[-1] is the residual norm
    residual: torch.Tensor  # β_m q_{m+1}, the next direction (zero after an invariant subspace)

    @property
    def steps(self) -> int:
        """Number of basis vectors."""
        return int(self.alpha.numel())

    def tridiagonal(self) -> torch.Tensor:
        """``T`` as a dense ``m × m`` matrix (on the CPU, in float64)."""
        alpha = self.alpha.double().cpu()
        off = self.beta[:-1].double().cpu()
        return torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of ``T`` (CPU, float64)."""
        # T is a small tridiagonal matrix: a dense symmetric eigensolve is the right tool
        # (spectrakit.linalg's solvers are SVD/Gram ones, for rectangular weights)
        return torch.linalg.eigh(self.tridiagonal())


def random_unit(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str,
                rademacher: bool = False) -> torch.Tensor:
    """A seeded random unit vector (Gaussian, or Rademacher ±1/√n), drawn on the CPU in
    float64 so that the same seed gives the same vector on every device and dtype.

    Args:
        n: length.
        generator: the CPU generator to draw from.
        dtype, device: of the result.
        rademacher: ±1 entries instead of Gaussian ones.
    """
    if rademacher:
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        v = torch.randn(n, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # classical Gram–Schmidt twice keeps Q orthonormal to working precision
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(matvec: MatVec, n: int, steps: int, start: torch.Tensor | None = None, *,
            generator: torch.Generator, state: LanczosState | None = None,
            allow_restart: bool = True) -> LanczosState:
    """Run, or continue, Lanczos with full reorthogonalization for up to ``steps`` more steps.

    Args:
        matvec: ``v ↦ A v`` for a symmetric ``A`` (flat vectors of ``n`` entries).
        n: the dimension.
        steps: how many basis vectors to add (the basis never exceeds ``n``).
        start: unit start vector (needed when ``state`` is ``None``).
        generator: seeds the fresh vectors after an invariant subspace.
        state: a previous run to extend.
        allow_restart: after an invariant subspace, go on from a fresh random vector
            orthogonal to the basis (top-k); ``False`` stops there (quadrature, whose
            weights belong to the start vector's Krylov space only).
    """
    if state is None:
        if start is None:
            raise SpectrakitError("internal: lanczos needs a start vector")
        done, alphas, betas = 0, [], []
        first = start.reshape(-1)
    else:
        done, alphas, betas = state.steps, list(state.alpha), list(state.beta)
        following = _following(state.residual, betas[-1], state.basis, n, generator, allow_restart)
        if following is None:
            return state
        first = following
    target = min(n, done + steps)
    # one buffer for the whole basis: rows are written in place, never re-stacked
    buffer = first.new_empty((target, n))
    if state is not None:
        buffer[:done] = state.basis
    buffer[done] = first
    count = done + 1
    eps = torch.finfo(buffer.dtype).eps
    scale = max([float(a.abs()) for a in alphas] + [float(b) for b in betas] + [0.0])
    while True:
        basis = buffer[:count]
        j = count - 1
        q = buffer[j]
        w = matvec(q).to(q.dtype)
        if j > 0 and float(betas[j - 1]) > 0:
            w = w - betas[j - 1] * buffer[j - 1]
        alpha = torch.dot(w, q)
        w = _orthogonalize(w - alpha * q, basis)
        beta = w.norm()
        scale = max(scale, float(alpha.abs()), float(beta))
        if float(beta) <= 64 * eps * max(scale, 1e-300) * n ** 0.5:  # an invariant subspace
            beta, w = beta.new_zeros(()), torch.zeros_like(w)
        alphas.append(alpha)
        betas.append(beta)
        if count >= target:
            break
        following = _following(w, beta, basis, n, generator, allow_restart)
        if following is None:
            break
        buffer[count] = following
        count += 1
    basis = buffer[:count]
    return LanczosState(basis=basis, alpha=torch.stack(alphas), beta=torch.stack(betas), residual=w)


def _following(residual: torch.Tensor, beta: torch.Tensor, basis: torch.Tensor, n: int,
               generator: torch.Generator, allow_restart: bool) -> torch.Tensor | None:
    """The next basis vector: the normalized residual, or after an invariant subspace a
    fresh random direction orthogonal to the basis (``None`` when there is none)."""
    if basis.shape[0] >= n:
        return None
    if float(beta) > 0:
        return residual / beta
    if not allow_restart:
        return None
    fresh = _orthogonalize(random_unit(n, generator, basis.dtype, basis.device), basis)
    if float(fresh.norm()) < 0.5:  # the basis already spans (numerically) everything
        return None
    return fresh / fresh.norm()


def _wanted(values: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "LA":
        return torch.arange(values.numel() - 1, values.numel() - 1 - k, -1)
    if which == "SA":
        return torch.arange(k)
    return values.abs().argsort(descending=True)[:k]


def top_eigenpairs(matvec: MatVec, n: int, k: int, *, tol: float = 1e-6, which: str = "LA",
                   max_steps: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", vectors: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The ``k`` extreme eigenvalues (and eigenvectors) of a symmetric operator.

    Args:
        matvec: ``v ↦ A v`` on flat vectors of ``n`` entries.
        n: the dimension.
        k: how many eigenpairs.
        tol: stop when every wanted Ritz pair has residual ``‖A x − θ x‖ ≤ tol·|θ|`` (for
            eigenvalues near zero, relative to the largest wanted ``|θ|``).
        which: ``"LA"`` largest algebraic (default), ``"LM"`` largest magnitude, ``"SA"``
            smallest algebraic.
        max_steps: most basis vectors (default ``min(n, max(30·k, 200))``).
        seed: seed of the start vector.
        dtype, device: of the vectors (the operator's).
        vectors: also return the Ritz vectors (``n × k``).

    Returns:
        ``(values, vectors or None, info)``: values ordered by ``which`` (descending for
        ``LA``/``LM``), info with ``steps``, ``products``, ``max_residual`` (relative) and
        ``converged`` (1.0 or 0.0).
    """
    if which not in WHICH:
        raise SpectrakitError(f"which={which!r} must be one of {', '.join(WHICH)}")
    if k < 1:
        raise SpectrakitError(f"k={k} must be ≥ 1")
    if k > n:
        raise SpectrakitError(f"k={k} is larger than the block's {n} parameters")
    limit = min(n, max_steps if max_steps is not None else max(30 * k, 200))
    if limit < k:
        raise SpectrakitError(f"max_steps={max_steps} is smaller than k={k}")
    generator = torch.Generator().manual_seed(seed)
    start = random_unit(n, generator, dtype, device)
    state: LanczosState | None = None
    steps = min(limit, max(2 * k + 2, 12))
    while True:
        state = lanczos(matvec, n, steps, start, generator=generator, state=state)
        theta, S = state.ritz()
        wanted = _wanted(theta, min(k, theta.numel()), which)
        residual = float(state.beta[-1]) * S[-1, wanted].abs()
        top = float(theta[wanted].abs().max()) if wanted.numel() else 0.0
        scale = theta[wanted].abs().clamp_min(max(top * 1e-12, 1e-300))
        converged = theta.numel() >= k and bool((residual <= tol * scale).all())
        if converged or state.steps >= limit:
            break
        steps = min(limit - state.steps, max(4, state.steps // 8))  # the Ritz check is cheap: look often
    values = theta[wanted].to(device=device, dtype=dtype)
    info = {"steps": float(state.steps), "max_residual": float((residual / scale).max()),
            "converged": 1.0 if converged else 0.0}
    ritz_vectors = None
    if vectors:
        ritz_vectors = state.basis.T @ S[:, wanted].to(device=state.basis.device, dtype=state.basis.dtype)
    return values, ritz_vectors, info


def quadrature(matvec: MatVec, n: int, steps: int, start: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss quadrature nodes ``θ`` and weights ``τ`` (summing to 1) of ``startᵀ δ(λ − A) start``.

    Args:
        matvec: ``v ↦ A v``.
        n: the dimension.
        steps: Lanczos steps (nodes), at most ``n``.
        start: the unit probe.
        generator: unused randomness source (kept for a uniform signature).
    """
    state = lanczos(matvec, n, steps, start, generator=generator, allow_restart=False)
    theta, S = state.ritz()
    return theta, S[0].square()
