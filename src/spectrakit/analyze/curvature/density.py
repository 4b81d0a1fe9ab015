"""The spectral density of a symmetric operator, by stochastic Lanczos quadrature or exactly.

**Stochastic Lanczos quadrature** (Ubaru, Chen & Saad 2017; :func:`~.lanczos.quadrature`):
each unit probe ``q`` gives Gauss nodes ``θᵢ`` and weights ``τᵢ`` with
``Σᵢ τᵢ f(θᵢ) = qᵀ f(A) q`` for every polynomial ``f`` of degree ``< 2·steps``, so the
average over probes estimates ``tr f(A)/n``. The density is smoothed by a Gaussian of
width ``σ`` on a grid:

    ρ(t) = (1/P) Σₚ Σᵢ τₚᵢ N(t; θₚᵢ, σ²).

Its first moment is exactly Hutchinson's ``(1/P) Σₚ qₚᵀ A qₚ``, and so carries the
same sampling error, ``≈ √(2/P) · ‖A − (tr A/n) I‖_F / n``. That error is large
beside ``tr A/n`` when the spectrum is indefinite and its trace nearly cancels,
as in an untrained network. Two things cut it:

* **deflation**: the ``d`` largest-magnitude eigenpairs ``(λᵢ, vᵢ)`` (Lanczos) enter
  exactly, each with weight ``1/n``, and the probes sample only ``P A P`` on the
  complement (``P = I − VVᵀ``), with weight ``(n − d)/n``;
* **orthogonal probes** in that complement (Haar frames), which sample without
  replacement. ``n − d`` of them give ``tr A`` and ``tr A²`` exactly, and fewer have the
  variance of the mean shrunk by ``(n − d − P)/(n − d − 1)``.

**Exact density**: when the operator is no larger than the quadrature's own product
budget (``n ≤ steps · probes``), its ``n`` columns cost fewer products than the
quadrature would. The dense symmetric eigenproblem then gives every eigenvalue with weight
``1/n``, and every moment is exact. ``method="auto"`` (the default of
:meth:`~.spectra.Curvature.density`) chooses it then, up to :data:`EXACT_LIMIT`.

>>> import torch
>>> A = torch.diag(torch.linspace(-1, 1, 50, dtype=torch.float64))
>>> d = slq_density(lambda v: A @ v, 50, steps=10, probes=50, dtype=torch.float64)
>>> abs(d.moment(1)) < 1e-12, abs(d.moment(2) - float(A.square().sum()) / 50) < 1e-12
(True, True)
>>> exact_density(lambda v: A @ v, 50, dtype=torch.float64).nodes.shape
torch.Size([1, 50])
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ...errors import SpectrakitError
from .lanczos import MatVec, quadrature, top_eigenpairs

DENSITY_METHODS = ("auto", "slq", "exact")
EXACT_LIMIT = 4096  # largest n whose dense n × n matrix "auto" builds (128 MiB in float64)
NOISY_FIRST_MOMENT = 0.05  # warn when the first moment's standard error passes this share of it


@dataclass
class Density:
    """A spectral density: the smoothed curve on a grid, and the quadrature it came from.

    ``nodes``/``weights`` are ``probes × nodes`` (each row's weights sum to 1; one row of
    all ``n`` eigenvalues for ``method="exact"``). Their moments ``Σ τ θᵖ``, averaged over
    the rows, estimate ``tr(Aᵖ)/n`` without the smoothing.

    Args:
        grid: the points where the density is evaluated.
        density: ``ρ`` on the grid (integrates to 1).
        nodes: quadrature nodes (or eigenvalues), one row per probe.
        weights: their weights, one row per probe.
        sigma: the Gaussian smoothing width.
        method: ``"slq"`` or ``"exact"``.
        sampled_dimension: the dimension the probes sample (``n`` minus the deflated
            pairs); it sets the without-replacement correction of :meth:`moment_stderr`.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    method: str = "slq"
    sampled_dimension: int = 0

    @property
    def probes(self) -> int:
        """Number of probes (1 for the exact density)."""
        return int(self.nodes.shape[0])

    def moment(self, power: int) -> float:
        """``(1/P) Σₚ Σᵢ τₚᵢ θₚᵢ^power``, an estimate of ``tr(A^power)/n`` (exact for ``method="exact"``).

        Args:
            power: the moment's order.
        """
        return float((self.weights * self.nodes.pow(power)).sum(dim=1).mean())

    def moment_stderr(self, power: int) -> float:
        """The standard error of :meth:`moment` over the probes (0 for the exact density).

        The probes of one frame are orthonormal and sample without replacement, so the
        plain ``s/√P`` is scaled by ``√((m − P)/(m − 1))``, where ``m`` is the sampled
        dimension and ``P ≤ m``. With ``P = m`` the frame is complete and the error is 0.

        Args:
            power: the moment's order.
        """
        if self.method == "exact":
            return 0.0
        per_probe = (self.weights * self.nodes.pow(power)).sum(dim=1)
        count = per_probe.numel()
        if count < 2:
            return math.inf
        stderr = float(per_probe.std()) / math.sqrt(count)
        m = self.sampled_dimension
        if 1 < m and count <= m:
            stderr *= math.sqrt((m - count) / (m - 1))
        return stderr

    def as_rows(self) -> list[dict[str, float]]:
        """``[{"eigenvalue": t, "density": ρ(t)}, …]`` for the grid."""
        return [{"eigenvalue": float(t), "density": float(d)} for t, d in zip(self.grid, self.density)]


def orthogonal_probes(n: int, count: int, generator: torch.Generator, dtype: torch.dtype,
                      device: torch.device | str, deflated: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``count`` random unit probes, orthonormal in frames of up to ``m`` (Haar-distributed:
    the Q of a Gaussian matrix), in the orthogonal complement of ``deflated``'s columns
    (``m = n − d``; the whole space when ``None``).

    Args:
        n: dimension.
        count: number of probes.
        generator: CPU generator.
        dtype, device: of the probes.
        deflated: ``n × d`` orthonormal columns the probes avoid, or ``None``.
    """
    V = None if deflated is None else deflated.detach().to(device="cpu", dtype=torch.float64)
    m = n - (0 if V is None else V.shape[1])
    probes: list[torch.Tensor] = []
    while len(probes) < count:
        width = min(m, count - len(probes))
        G = torch.randn(n, width, generator=generator, dtype=torch.float64)
        if V is not None:
            for _ in range(2):  # twice, so the probes are orthogonal to V to working precision
                G = G - V @ (V.T @ G)
        Q, R = torch.linalg.qr(G)
        Q = Q * torch.sign(R.diagonal()).where(R.diagonal() != 0, torch.ones(()))  # Haar, not QR-biased
        probes.extend(Q.T.to(device=device, dtype=dtype))
    return probes


def smoothed(nodes: torch.Tensor, weights: torch.Tensor, sigma: float | None, grid_points: int,
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(grid, ρ, σ)``: the Gaussian-smoothed density of weighted nodes, one row per probe.

    Args:
        nodes: ``P × m`` nodes.
        weights: ``P × m`` weights (each row sums to 1).
        sigma: smoothing width (default 0.2% of the nodes' spread).
        grid_points: points of the grid (it reaches 6σ past the extreme nodes).
    """
    nodes, weights = nodes.double().cpu(), weights.double().cpu()
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, 1e-12 * max(abs(low), abs(high), 1e-300))
    width = sigma if sigma is not None else 0.002 * spread
    if width <= 0:
        raise SpectrakitError(f"sigma={sigma} must be > 0")
    grid = torch.linspace(low - 6 * width, high + 6 * width, grid_points, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for row, row_weights in zip(nodes, weights):  # one probe at a time: grid × n stays small
        kernel = torch.exp(-0.5 * ((grid[:, None] - row[None, :]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        density += kernel @ row_weights
    return grid, density / nodes.shape[0], width


def slq_density(matvec: MatVec, n: int, steps: int = 60, probes: int = 8, *, seed: int = 0,
                grid_points: int = 2000, sigma: float | None = None, deflate: int = 0,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Density:
    """The spectral density of ``A`` by stochastic Lanczos quadrature.

    It warns when the first moment's standard error exceeds 5% of its value: that happens
    when ``tr A`` nearly cancels across an indefinite spectrum. More probes, or the exact
    density of a small operator, tighten it.

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        steps: Lanczos steps per probe (quadrature nodes; at most ``n − deflate``).
        probes: number of random probes (orthonormal, see :func:`orthogonal_probes`).
        seed: seed of the probes.
        grid_points: points of the returned grid.
        sigma: Gaussian smoothing width (default 0.2% of the spread of the nodes).
        deflate: number of largest-magnitude eigenpairs taken exactly (0: plain SLQ).
        dtype, device: of the vectors.
    """
    if steps < 1 or probes < 1:
        raise SpectrakitError(f"steps={steps} and probes={probes} must be ≥ 1")
    if deflate < 0 or deflate >= n:
        raise SpectrakitError(f"deflate={deflate} must lie in [0, n) with n = {n}")
    generator = torch.Generator().manual_seed(seed)
    exact = torch.zeros(0, dtype=torch.float64)
    operator = matvec
    V = None
    if deflate:
        values, V, _ = top_eigenpairs(matvec, n, deflate, tol=1e-8, which="LM", seed=seed, dtype=dtype,
                                      device=device, vectors=True)
        assert V is not None
        exact = values.double().cpu()
        deflated = V

        def project(v: torch.Tensor) -> torch.Tensor:
            return v - deflated @ (deflated.T @ v)

        def operator(v: torch.Tensor) -> torch.Tensor:
            return project(matvec(project(v)))

    rest = n - deflate
    steps = min(steps, rest)
    node_rows, weight_rows = [], []
    for start in orthogonal_probes(n, probes, generator, dtype, device, deflated=V):
        theta, tau = quadrature(operator, n, steps, start, generator)
        pad = steps - theta.numel()  # an early invariant subspace: pad with zero-weight nodes
        theta = torch.cat([theta, theta.new_full((pad,), float(theta[-1]))])
        tau = torch.cat([tau, tau.new_zeros(pad)]) * (rest / n)
        node_rows.append(torch.cat([exact, theta]))
        weight_rows.append(torch.cat([torch.full_like(exact, 1.0 / n), tau]))
    nodes, weights = torch.stack(node_rows), torch.stack(weight_rows)
    grid, density, width = smoothed(nodes, weights, sigma, grid_points)
    result = Density(grid=grid, density=density, nodes=nodes, weights=weights, sigma=width, method="slq",
                     sampled_dimension=rest)
    first, first_stderr = result.moment(1), result.moment_stderr(1)
    if math.isfinite(first_stderr) and first_stderr > NOISY_FIRST_MOMENT * abs(first):
        warnings.warn(f"density: the first moment {first:.4g} has a standard error of {first_stderr:.2g} "
                      f"({first_stderr / max(abs(first), 1e-300):.0%} of it; tr/n is small beside the spread of "
                      f"the spectrum); more probes tighten it"
                      + (", and method='exact' makes it exact" if n <= EXACT_LIMIT else ""), stacklevel=2)
    return result


def exact_density(matvec: MatVec, n: int, *, grid_points: int = 2000, sigma: float | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Density:
    """The density of all ``n`` eigenvalues of ``A``, built from its ``n`` columns (``n`` products).

    Args:
        matvec: ``v ↦ A v``.
        n: dimension.
        grid_points: points of the returned grid.
        sigma: Gaussian smoothing width (default 0.2% of the spectrum's spread).
        dtype, device: of the vectors.
    """
    if n < 1:
        raise SpectrakitError(f"n={n} must be ≥ 1")
    columns = torch.empty((n, n), dtype=dtype, device=device)
    unit = torch.zeros(n, dtype=dtype, device=device)
    for i in range(n):
        unit[i] = 1
        columns[i] = matvec(unit)
        unit[i] = 0
    dense = columns.double().cpu()
    # A is symmetric; the products are so to rounding, and eigvalsh reads one triangle only
    values = torch.linalg.eigvalsh((dense + dense.T) / 2)
    nodes, weights = values[None, :], torch.full((1, n), 1.0 / n, dtype=torch.float64)
    grid, density, width = smoothed(nodes, weights, sigma, grid_points)
    return Density(grid=grid, density=density, nodes=nodes, weights=weights, sigma=width, method="exact",
                   sampled_dimension=n)
