"""Randomized trace estimates of a symmetric operator.

* **Hutchinson** (1989): ``tr A ≈ (1/m) Σⱼ zⱼᵀ A zⱼ`` with Rademacher ``zⱼ``; the standard
  error is the sample standard deviation over ``√m``.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021): of ``m`` products, ``m/3`` sketch
  ``Q = orth(A S)``, ``m/3`` give ``tr(QᵀAQ)`` exactly, and the last ``m/3`` estimate the
  rest by Hutchinson on ``(I − QQᵀ) A (I − QQᵀ)``; its standard error is the Hutchinson
  part's (the ``Q`` part has no sampling error once ``Q`` is drawn). Error ``O(1/m)``
  instead of ``O(1/√m)`` when a few eigenvalues dominate, as they do in Hessians.

The spectral density (stochastic Lanczos quadrature) is in :mod:`.density`.

>>> import torch
>>> A = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64)) ; A[0, 0] = 50
>>> est = hutch_plus_plus(lambda v: A @ v, 200, probes=30, seed=0, dtype=torch.float64)
>>> abs(est.value - float(A.trace())) < 3 * est.stderr + 1e-9
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import SpectrakitError
from .lanczos import MatVec, random_unit

TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error and the number of products it used."""

    value: float
    stderr: float
    probes: int
    method: str

    def __float__(self) -> float:
        return self.value


def _rademacher(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return random_unit(n, generator, dtype, device, rademacher=True) * math.sqrt(n)


def _stderr(samples: list[float]) -> float:
    if len(samples) < 2:
        return math.inf
    values = torch.tensor(samples, dtype=torch.float64)
    return float(values.std(unbiased=True)) / math.sqrt(len(samples))


def hutchinson(matvec: MatVec, n: int, probes: int = 30, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> TraceEstimate:
    """Hutchinson's estimate of ``tr A`` from ``probes`` Rademacher products.

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        probes: number of products.
        seed: seed of the probes.
        dtype, device: of the probes.
    """
    if probes < 1:
        raise SpectrakitError(f"probes={probes} must be ≥ 1")
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = _rademacher(n, generator, dtype, device)
        samples.append(float(torch.dot(z, matvec(z)).double()))
    return TraceEstimate(sum(samples) / probes, _stderr(samples), probes, "hutchinson")


def hutch_plus_plus(matvec: MatVec, n: int, probes: int = 30, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> TraceEstimate:
    """Hutch++ estimate of ``tr A`` from ``probes`` products (at least 3).

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        probes: total number of products (a third each for the sketch, its trace and the rest).
        seed: seed of the sketch and the probes.
        dtype, device: of the vectors.
    """
    if probes < 3:
        raise SpectrakitError(f"probes={probes} must be ≥ 3 for hutch++")
    generator = torch.Generator().manual_seed(seed)
    sketch = min(probes // 3, n)
    rest = probes - 2 * sketch
    S = torch.stack([_rademacher(n, generator, dtype, device) for _ in range(sketch)], dim=1)
    AS = torch.stack([matvec(S[:, j]) for j in range(sketch)], dim=1)
    Q = torch.linalg.qr(AS.double()).Q.to(dtype)
    exact = sum(float(torch.dot(Q[:, j], matvec(Q[:, j])).double()) for j in range(Q.shape[1]))
    samples = []
    for _ in range(rest):
        z = _rademacher(n, generator, dtype, device)
        z = z - Q @ (Q.T @ z)
        samples.append(float(torch.dot(z, matvec(z)).double()))
    if not samples:
        return TraceEstimate(exact, 0.0 if sketch == n else math.inf, 2 * sketch, "hutch++")
    return TraceEstimate(exact + sum(samples) / len(samples), _stderr(samples), probes, "hutch++")


def estimate_trace(matvec: MatVec, n: int, probes: int, method: str, *, seed: int, dtype: torch.dtype,
                   device: torch.device | str) -> TraceEstimate:
    """Dispatch to :func:`hutch_plus_plus` or :func:`hutchinson` by ``method``.

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        probes: number of products.
        method: ``"hutch++"`` or ``"hutchinson"``.
        seed: seed of the probes.
        dtype, device: of the vectors.
    """
    if method == "hutch++":
        return hutch_plus_plus(matvec, n, probes, seed=seed, dtype=dtype, device=device)
    if method == "hutchinson":
        return hutchinson(matvec, n, probes, seed=seed, dtype=dtype, device=device)
    raise SpectrakitError(f"method={method!r} must be one of {', '.join(TRACE_METHODS)}")
