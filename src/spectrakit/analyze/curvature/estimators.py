"""Randomized trace estimates and the spectral density of a symmetric operator.

* **Hutchinson** (1989): ``tr A ≈ (1/m) Σⱼ zⱼᵀ A zⱼ`` with Rademacher ``zⱼ``; the standard
  error is the sample standard deviation over ``√m``.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021): of ``m`` products, ``m/3`` sketch
  ``Q = orth(A S)``, ``m/3`` give ``tr(QᵀAQ)`` exactly, and the last ``m/3`` estimate the
  rest by Hutchinson on ``(I − QQᵀ) A (I − QQᵀ)``; its standard error is the Hutchinson
  part's (the ``Q`` part has no sampling error once ``Q`` is drawn). Error ``O(1/m)``
  instead of ``O(1/√m)`` when a few eigenvalues dominate, as they do in Hessians.
* **Density** by stochastic Lanczos quadrature (:func:`~.lanczos.quadrature`), smoothed
  by a Gaussian of width ``σ`` on a grid: ``ρ(t) = (1/P) Σₚ Σᵢ τₚᵢ N(t; θₚᵢ, σ²)``.

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
from .lanczos import MatVec, quadrature, random_unit, top_eigenpairs

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


@dataclass
class Density:
    """A spectral density: the smoothed curve on a grid, and the quadrature it came from.

    ``nodes``/``weights`` are ``probes × steps`` (weights of each probe sum to 1); their
    moments ``Σ τ θᵖ`` averaged over probes estimate ``tr(Aᵖ)/n`` without the smoothing.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float

    def moment(self, power: int) -> float:
        """``(1/P) Σₚ Σᵢ τₚᵢ θₚᵢ^power``, an estimate of ``tr(A^power)/n``.

        Args:
            power: the moment's order.
        """
        return float((self.weights * self.nodes.pow(power)).sum(dim=1).mean())

    def moment_stderr(self, power: int) -> float:
        """The standard error of :meth:`moment` over the probes (an upper estimate, since
        orthogonal probes vary less than independent ones).

        Args:
            power: the moment's order.
        """
        per_probe = (self.weights * self.nodes.pow(power)).sum(dim=1)
        return float(per_probe.std()) / math.sqrt(per_probe.numel()) if per_probe.numel() > 1 else math.inf

    def as_rows(self) -> list[dict[str, float]]:
        """``[{"eigenvalue": t, "density": ρ(t)}, …]`` for the grid."""
        return [{"eigenvalue": float(t), "density": float(d)} for t, d in zip(self.grid, self.density)]


def orthogonal_probes(n: int, count: int, generator: torch.Generator, dtype: torch.dtype,
                      device: torch.device | str) -> list[torch.Tensor]:
    """``count`` random unit probes, orthonormal in groups of up to ``n`` (Haar-distributed:
    the Q of a Gaussian matrix), so that ``n`` probes give ``tr A / n`` exactly and fewer
    ones vary less than independent probes.

    Args:
        n: dimension.
        count: number of probes.
        generator: CPU generator.
        dtype, device: of the probes.
    """
    probes: list[torch.Tensor] = []
    while len(probes) < count:
        width = min(n, count - len(probes))
        Q, R = torch.linalg.qr(torch.randn(n, width, generator=generator, dtype=torch.float64))
        Q = Q * torch.sign(R.diagonal()).where(R.diagonal() != 0, torch.ones(()))  # Haar, not QR-biased
        probes.extend(Q.T.to(device=device, dtype=dtype))
    return probes


def slq_density(matvec: MatVec, n: int, steps: int = 60, probes: int = 8, *, seed: int = 0,
                grid_points: int = 2000, sigma: float | None = None, deflate: int = 0,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Density:
    """The spectral density of ``A`` by stochastic Lanczos quadrature.

    With ``deflate = d > 0`` the ``d`` largest-magnitude eigenpairs ``(λᵢ, vᵢ)`` are found
    first (Lanczos) and enter exactly, each with weight ``1/n``; the probes then sample
    only the rest, ``P A P`` with ``P = I − VVᵀ``, with weight ``(n − d)/n``. Hessian spectra
    are a bulk plus a few outliers, and the outliers are what makes plain SLQ's moments
    vary from probe to probe (the same idea as Hutch++ for the trace).

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        steps: Lanczos steps per probe (quadrature nodes; at most ``n``).
        probes: number of random probes (orthonormal, see :func:`orthogonal_probes`).
        seed: seed of the probes.
        grid_points: points of the returned grid.
        sigma: Gaussian smoothing width (default 0.2% of the spread of the nodes).
        deflate: number of outlying eigenpairs taken exactly (0: plain SLQ).
        dtype, device: of the vectors.
    """
    if steps < 1 or probes < 1:
        raise SpectrakitError(f"steps={steps} and probes={probes} must be ≥ 1")
    if deflate < 0 or deflate >= n:
        raise SpectrakitError(f"deflate={deflate} must lie in [0, n) with n = {n}")
    generator = torch.Generator().manual_seed(seed)
    exact = torch.zeros(0, dtype=torch.float64)
    operator = matvec
    if deflate:
        values, V, _ = top_eigenpairs(matvec, n, deflate, tol=1e-8, which="LM", seed=seed, dtype=dtype,
                                      device=device, vectors=True)
        assert V is not None
        exact = values.double().cpu()

        def project(v: torch.Tensor) -> torch.Tensor:
            return v - V @ (V.T @ v)

        def operator(v: torch.Tensor) -> torch.Tensor:
            return project(matvec(project(v)))

    rest = n - deflate
    steps = min(steps, rest)
    node_rows, weight_rows = [], []
    for start in orthogonal_probes(n, probes, generator, dtype, device):
        if deflate:
            start = project(start)
            start = start / start.norm()
        theta, tau = quadrature(operator, n, steps, start, generator)
        pad = steps - theta.numel()  # an early invariant subspace: pad with zero-weight nodes
        theta = torch.cat([theta, theta.new_full((pad,), float(theta[-1]))])
        tau = torch.cat([tau, tau.new_zeros(pad)]) * (rest / n)
        node_rows.append(torch.cat([exact, theta]))
        weight_rows.append(torch.cat([torch.full_like(exact, 1.0 / n), tau]))
    nodes, weights = torch.stack(node_rows), torch.stack(weight_rows)
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, 1e-12 * max(abs(low), abs(high), 1e-300))
    width = sigma if sigma is not None else 0.002 * spread
    if width <= 0:
        raise SpectrakitError(f"sigma={sigma} must be > 0")
    grid = torch.linspace(low - 6 * width, high + 6 * width, grid_points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    density = (kernel * weights.reshape(1, -1)).sum(dim=1) / probes
    return Density(grid=grid, density=density, nodes=nodes, weights=weights, sigma=width)
