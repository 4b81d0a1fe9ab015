"""The spectral norm σ₁ three ways: power iteration, the Gram-iteration bound, exact.

* **power** — ``v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖``, ``σ₁ ≈ uᵀWv``. Cheap, a lower
  estimate; with a persistent :class:`PowerIteration` a training loop pays one
  iteration per step (as in Miyato et al.'s spectral normalization).
* **gram** — Gram iteration (Delattre et al., 2023): ``G₀ = W``, ``G_{t+1} = G_tᴴG_t``
  with Frobenius rescaling; ``σ₁ ≤ ‖G_T‖_F^{1/2^T}`` holds at every ``T`` and
  converges super-exponentially. A certified upper bound.
* **exact** — the largest singular value from a full SVD.

All three are differentiable with respect to ``W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SpectrakitError
from ._prepare import as_matrix, transpose
from .randomized import gaussian_sketch

DEFAULT_GRAM_ITERS = 10
DEFAULT_POWER_ITERS = 50


_NORM_FLOOR = 1e-30  # a zero vector is divided by this, so it stays zero (no 0/0)


def _normalize(x: torch.Tensor, eps: float = _NORM_FLOOR) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _normalize_all_(vectors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Scale each 1-D vector to unit length in place (a zero vector stays zero); returns the norms.

    Three foreach calls for the whole list instead of three operator calls per vector.
    """
    norms = torch._foreach_norm(vectors)
    torch._foreach_div_(vectors, torch._foreach_clamp_min(norms, _NORM_FLOOR))
    return norms


def _kept(vector: torch.Tensor | None) -> torch.Tensor:
    """A stored power-iteration vector, which :meth:`PowerIteration.prepare` must have made."""
    if vector is None:
        raise SpectrakitError("PowerIteration has no vectors yet: call prepare(W) or step(W) first")
    return vector


class PowerIteration:
    """Power iteration whose singular vectors persist between calls.

    Each call runs ``n_iter`` iterations from the vectors left by the previous call
    (without gradient), then returns ``σ₁ ≈ uᵀ W v`` — differentiable, with gradient
    ``u vᵀ``, the exact gradient of σ₁ once ``u, v`` have converged.

    ``u`` and ``v`` read as unit vectors (a zero vector stays zero). :func:`power_step_host`
    may leave them stored as unnormalized multiples with their norms on the host; they are
    then normalized on first read, and :meth:`scaled_vectors` gives ``u vᵀ`` without it.

    Args:
        n_iter: iterations per call.
        seed: seed of the random starting vectors (the same seed gives the same estimates).

    >>> W = torch.randn(64, 32)
    >>> estimate = PowerIteration(n_iter=1)
    >>> for _ in range(200):
    ...     sigma = estimate(W)
    >>> bool(torch.isclose(sigma, torch.linalg.matrix_norm(W, 2), rtol=1e-4))
    True
    """

    def __init__(self, n_iter: int = 1, seed: int = 0) -> None:
        if n_iter < 0:
            raise SpectrakitError(f"n_iter={n_iter} must be ≥ 0")
        self.n_iter = n_iter
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        # stored vectors and their norms: u = _u / _u_norm, v = _v / _v_norm (1.0: already unit)
        self._u: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._u_norm = self._v_norm = 1.0

    @property
    def u(self) -> torch.Tensor | None:
        if self._u is not None and self._u_norm != 1.0:
            self._u, self._u_norm = self._u / max(self._u_norm, _NORM_FLOOR), 1.0
        return self._u

    @u.setter
    def u(self, value: torch.Tensor | None) -> None:
        self._u, self._u_norm = value, 1.0

    @property
    def v(self) -> torch.Tensor | None:
        if self._v is not None and self._v_norm != 1.0:
            self._v, self._v_norm = self._v / max(self._v_norm, _NORM_FLOOR), 1.0
        return self._v

    @v.setter
    def v(self, value: torch.Tensor | None) -> None:
        self._v, self._v_norm = value, 1.0

    def scaled_vectors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(x, y, s)`` with ``u vᵀ = s · x yᵀ``, without normalizing the stored vectors."""
        norms = self._u_norm * self._v_norm
        return _kept(self._u), _kept(self._v), (1 / norms if norms > 0 else 0.0)  # zero vectors: any scale

    def sized_for(self, W: torch.Tensor) -> bool:
        """Whether vectors are kept and have ``W``'s shape (``u``: rows, ``v``: columns, batch)."""
        u, v = self._u, self._v
        return (v is not None and v.shape[-1] == W.shape[-1] and v.shape[:-1] == W.shape[:-2]
                and u is not None and u.shape[-1] == W.shape[-2])

    def prepare(self, W: torch.Tensor) -> None:
        """Vectors for ``W``: fresh (random ``v``) for a new shape, moved to ``W``'s dtype and device."""
        if not self.sized_for(W):
            v = _normalize(gaussian_sketch((*W.shape[:-2], W.shape[-1]), W, self.seed))
            self.u, self.v = _normalize((W @ v.unsqueeze(-1)).squeeze(-1)), v
        u, v = _kept(self._u), _kept(self._v)
        if v.dtype != W.dtype or v.device != W.device:
            self._u = u.to(device=W.device, dtype=W.dtype)
            self._v = v.to(device=W.device, dtype=W.dtype)

    def fits(self, W: torch.Tensor) -> bool:
        """Whether the kept vectors can be used for ``W`` as they are (shape, dtype, device)."""
        v = self._v
        return self.sized_for(W) and v is not None and v.dtype == W.dtype and v.device == W.device

    def step(self, W: torch.Tensor, n_iter: int | None = None) -> None:
        """Advance the kept vectors ``n_iter`` steps (default :attr:`n_iter`) on ``W``, without
        gradient and without forming σ₁ (fresh vectors first for a new shape)."""
        n_iter = self.n_iter if n_iter is None else n_iter
        with torch.no_grad():
            Wd = W.detach()
            self.prepare(Wd)
            if not n_iter:
                return
            if Wd.ndim == 2 and not Wd.is_complex():
                power_steps([self], [Wd], n_iter)
                return
            u, v = _kept(self.u), _kept(self.v)
            for _ in range(n_iter):
                v = _normalize((transpose(Wd) @ u.unsqueeze(-1)).squeeze(-1))
                u = _normalize((Wd @ v.unsqueeze(-1)).squeeze(-1))
            self.u, self.v = u, v

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        if self.n_iter or not self.fits(W):  # a read with vectors that fit needs no step
            self.step(W)
        u, v = _kept(self.u), _kept(self.v)
        if W.ndim == 2 and not W.is_complex():
            return torch.dot(u, torch.mv(W, v))
        sigma = (u.conj().unsqueeze(-2) @ W @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return sigma.real if sigma.is_complex() else sigma


def power_steps(states: Sequence[PowerIteration], matrices: Sequence[torch.Tensor],
                n_iter: int) -> tuple[torch.Tensor, ...]:
    """Advance several persistent power iterations ``n_iter ≥ 1`` steps together (no gradient).

    For real 2-D matrices ``W_l`` whose states already :meth:`~PowerIteration.fits` them, each
    step is ``v ← Wᵀu/‖Wᵀu‖, w ← Wv, u ← w/‖w‖`` and the estimate is ``σ₁ ≈ ‖Wv‖`` — equal to
    ``uᵀWv`` for the new ``u`` without a third product. Norms and divisions run as foreach
    calls over all matrices at once (one fused kernel each on an accelerator). A zero ``Wᵀu``
    or ``Wv`` leaves zero vectors and ``σ = 0`` (the caller restarts those).

    Returns the 0-dim estimates ``‖W_l v_l‖``, one per matrix; the states hold the new vectors.
    """
    us = [_kept(state.u) for state in states]
    for _ in range(n_iter):
        vs = [torch.mv(W.mT, u) for W, u in zip(matrices, us)]
        _normalize_all_(vs)
        us = [torch.mv(W, v) for W, v in zip(matrices, vs)]
        sigmas = _normalize_all_(us)
    for state, u, v in zip(states, us, vs):
        state.u, state.v = u, v
    return sigmas


def host_floats(scalars: Sequence[torch.Tensor]) -> list[float]:
    """0-dim tensors as Python floats: one ``.item()`` each on the CPU (there is no
    synchronization to save, and stacking costs more), one stacked transfer elsewhere."""
    if scalars[0].device.type == "cpu":
        return [x.item() for x in scalars]
    dtype = scalars[0].dtype
    return torch.stack([x if x.dtype == dtype else x.to(dtype) for x in scalars]).tolist()


def power_step_host(states: Sequence[PowerIteration], matrices: Sequence[torch.Tensor],
                    extra: Sequence[torch.Tensor] | None = None) -> tuple[list[float], list[float]]:
    """One power-iteration step on several real 2-D matrices, with σ₁ read on the host.

    For callers that need σ₁ as Python numbers anyway (a penalty checking finiteness):
    per matrix ``a = Wᵀu`` (``u`` normalized through the scalar argument of ``addmv``),
    ``w = W a`` and ``σ₁ ≈ ‖w‖/‖a‖ = ‖W v‖`` with ``v = a/‖a‖`` — the same estimate as
    :func:`power_steps`. The new ``u = w/‖w‖`` and ``v`` are kept *unnormalized*, with their
    norms on the host: normalizing four vectors per layer would cost as many operator calls
    as the products themselves, and a consumer of ``u vᵀ`` can fold the norms into a scalar
    (:meth:`PowerIteration.scaled_vectors`). So a step is two products and two norms per
    matrix, and all the norms — also of the ``extra`` tensors (e.g. biases), so the caller
    needs no second synchronization — reach the host together: one ``.item()`` each on the
    CPU, where that is cheapest, one stacked transfer elsewhere.

    ``‖w‖`` is of order σ₁², so this is for σ₁ within about 10^±9 in single precision
    (beyond, ``σ`` reads ∞ or 0; a penalty ``(σ₁² − 1)²`` overflows single precision from
    σ₁ ≈ 1e9 anyway). A zero ``a`` or ``w`` gives ``σ = 0`` (the caller restarts those
    states). The states must :meth:`~PowerIteration.fits` their matrices.

    Returns ``(sigmas, extra_norms)`` as floats.
    """
    vectors: list[torch.Tensor] = []  # a₁, w₁, a₂, w₂, …
    for state, W in zip(states, matrices):
        a = torch.addmv(_kept(state._v), W.mT, _kept(state._u), beta=0, alpha=1 / max(state._u_norm, _NORM_FLOOR))
        vectors += (a, torch.mv(W, a))
    host = host_floats(torch._foreach_norm(vectors + list(extra)) if extra else torch._foreach_norm(vectors))
    sigmas = []
    for i, state in enumerate(states):
        a_norm, w_norm = host[2 * i], host[2 * i + 1]
        state._v, state._v_norm, state._u, state._u_norm = vectors[2 * i], a_norm, vectors[2 * i + 1], w_norm
        sigmas.append(w_norm / max(a_norm, _NORM_FLOOR))
    return sigmas, host[2 * len(states):]


def gram_iteration_bound(W: torch.Tensor, n_iter: int = DEFAULT_GRAM_ITERS) -> torch.Tensor:
    """Certified upper bound on σ₁(W) by ``n_iter`` Gram iterations (batched).

    With rescaling ``G ← G/‖G‖_F`` before each squaring and ``s ← 2(s + log‖G‖_F)``,
    the bound is ``exp((s + log‖G_T‖_F) / 2^T)`` (times a rounding margin of order
    ``√n·ε``). It never falls below σ₁ and
    overshoots by at most a factor ``min(m, n)^{1/2^{T+1}}``.

    >>> W = torch.randn(100, 50, dtype=torch.float64)
    >>> bound, sigma = gram_iteration_bound(W), torch.linalg.matrix_norm(W, 2)
    >>> bool(bound >= sigma) and bool(bound <= 1.01 * sigma)
    True
    """
    if n_iter < 1:
        raise SpectrakitError(f"n_iter={n_iter} must be ≥ 1 for the Gram iteration")
    G = W
    log_scale = torch.zeros(W.shape[:-2], dtype=W.real.dtype if W.is_complex() else W.dtype,
                            device=W.device)
    for step in range(n_iter):
        norm = torch.linalg.matrix_norm(G, "fro").clamp_min(torch.finfo(log_scale.dtype).tiny)
        G = G / norm[..., None, None]
        log_scale = 2 * (log_scale + norm.log())
        if step == 0 and W.shape[-2] < W.shape[-1]:
            G = G @ transpose(G)  # same nonzero spectrum, smaller matrix
        else:
            G = transpose(G) @ G
    final = torch.linalg.matrix_norm(G, "fro").clamp_min(torch.finfo(log_scale.dtype).tiny)
    bound = torch.exp((log_scale + final.log()) / 2**n_iter)
    # Once converged the bound meets σ₁ to the last bit; a margin of a few hundred ulps
    # keeps rounding in the products and norms from pushing it below.
    rounding_margin = 1 + 64 * min(W.shape[-2:]) ** 0.5 * torch.finfo(log_scale.dtype).eps
    return bound * rounding_margin


def spectral_norm(W: torch.Tensor, method: str = "power", *, n_iter: int | None = None,
                  state: PowerIteration | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """σ₁(W) for a matrix or batch ``(..., m, n)``.

    Args:
        method: ``"power"`` (an estimate from below), ``"gram"`` (an upper bound that
            is never below σ₁) or ``"exact"``.
        n_iter: iterations (power: 50 from a fresh start, or ``state.n_iter``; gram: 10).
        state: a :class:`PowerIteration` whose vectors persist across calls, for
            training loops; ``n_iter`` then defaults to its own.
        dtype: compute dtype (the Gram bound defaults to float64 so that rounding
            cannot push it below σ₁).

    >>> import spectrakit as sk
    >>> W = torch.randn(128, 64, dtype=torch.float64)
    >>> exact = sk.linalg.spectral_norm(W, "exact")
    >>> bool(sk.linalg.spectral_norm(W, "gram") >= exact)
    True
    """
    if method == "exact":
        W = as_matrix(W, dtype)
        return torch.linalg.matrix_norm(W, 2)
    if method == "gram":
        W = as_matrix(W, dtype or (torch.complex128 if W.is_complex() else torch.float64))
        return gram_iteration_bound(W, DEFAULT_GRAM_ITERS if n_iter is None else n_iter)
    if method == "power":
        W = as_matrix(W, dtype)
        if state is None:
            state = PowerIteration(DEFAULT_POWER_ITERS if n_iter is None else n_iter)
        elif n_iter is not None:
            state.n_iter = n_iter
        return state(W)
    raise SpectrakitError(f"method={method!r} is not one of power, gram, exact")
