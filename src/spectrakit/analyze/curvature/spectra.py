"""``spectrakit.analyze.hessian``: spectra of the loss curvature, matrix-free.

``hessian(model, loss_fn, batches)`` wraps exact curvature–vector products
(:mod:`.operators`: Hessian by double backward, generalized Gauss–Newton ``JᵀHJ`` and
empirical Fisher ``(1/N)Σ∇ℓ∇ℓᵀ``, averaged over the batches) and offers:

* ``top(k, tol)``: extreme eigenvalues (and vectors) by Lanczos with full
  reorthogonalization (:mod:`.lanczos`);
* ``trace(probes, method)``: Hutch++ or Hutchinson with a standard error (:mod:`.estimators`);
* ``density(steps, probes)``: the spectral density by stochastic Lanczos quadrature;
* ``per_layer()``: top eigenvalue and trace of every block's diagonal block ``H_bb``,
  as a :class:`~spectrakit.analyze.SpectrumTable`;
* ``alignment(k)``: the share of the gradient in the top-``k`` eigenspace.

>>> import torch, spectrakit as sk
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
>>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
>>> h = sk.analyze.hessian(model, torch.nn.functional.mse_loss, [(x, y)])
>>> from torch.func import functional_call
>>> names = [n for n, _ in model.named_parameters()]
>>> def loss(*flat): return torch.nn.functional.mse_loss(functional_call(model, dict(zip(names, flat)), (x,)), y)
>>> full = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in model.parameters()))
>>> H = torch.cat([torch.cat([b.reshape(p.numel(), q.numel()) for b, q in zip(row, model.parameters())], 1)
...                for row, p in zip(full, model.parameters())])
>>> bool(torch.allclose(h.top(2).values, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-8))
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..._progress import progress as progress_bar
from ...errors import SpectrakitError
from ..table import SpectrumTable
from .alignment import gradient_alignment
from .density import DENSITY_METHODS, EXACT_LIMIT, Density, exact_density, slq_density
from .estimators import TraceEstimate, estimate_trace
from .lanczos import top_eigenpairs
from .operators import CurvatureOperator, Forward, LossFn

PER_LAYER_DISPLAY = (
    ("name", "block"), ("params", "params"), ("top_eigenvalue", "λ_max"), ("trace", "trace"),
    ("trace_stderr", "± SE"), ("lanczos_steps", "steps"), ("status", "status"),
)


@dataclass
class TopEigen:
    """Extreme eigenvalues of a curvature operator, with Lanczos' account of them."""

    values: torch.Tensor
    vectors: torch.Tensor | None
    steps: int
    max_residual: float
    converged: bool


class Curvature:
    """The curvature (Hessian, GGN or empirical Fisher) of a loss over chosen parameters.

    Build it with :func:`hessian`. Every method is seeded (``seed``) and deterministic;
    vectors live on the model's device in its dtype (use a float64 model for exact
    comparisons).

    Args:
        operator: the :class:`~.operators.CurvatureOperator` it wraps.
    """

    def __init__(self, operator: CurvatureOperator) -> None:
        self.operator = operator

    @property
    def kind(self) -> str:
        """``"hessian"``, ``"ggn"`` or ``"fisher"``."""
        return self.operator.kind

    @property
    def size(self) -> int:
        """Number of parameters ``n``."""
        return self.operator.size

    @property
    def blocks(self) -> list[str]:
        """Block names, in model order."""
        return list(self.operator.blocks)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the covered parameters, in the order of the flat vectors."""
        return list(self.operator.names)

    def matvec(self, vector: torch.Tensor, block: str | None = None) -> torch.Tensor:
        """``A v`` (flat), or ``A_bb v`` for one block.

        Args:
            vector: flat vector of :attr:`size` (or the block's size) entries.
            block: a block name, or ``None``.
        """
        return self.operator.matvec(vector, block)

    def _matvec(self, block: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda v: self.operator.matvec(v, block)

    def top(self, k: int = 1, tol: float = 1e-6, *, vectors: bool = False, which: str = "LA",
            max_steps: int | None = None, seed: int = 0, block: str | None = None) -> TopEigen:
        """The ``k`` largest eigenvalues by Lanczos with full reorthogonalization.

        Args:
            k: how many.
            tol: relative residual ``‖Ax − θx‖ ≤ tol·|θ|`` of every returned pair.
            vectors: also return the eigenvectors (``n × k``, orthonormal).
            which: ``"LA"`` largest (default), ``"LM"`` largest magnitude, ``"SA"`` smallest.
            max_steps: most Lanczos steps (default ``min(n, max(30k, 200))``); a warning-free
                result that did not converge has ``converged=False``.
            seed: seed of the start vector.
            block: restrict to one block's diagonal block.
        """
        n = self.operator.block_size(block)
        if k > n:
            where = f"block {block!r}" if block is not None else "the chosen parameters"
            raise SpectrakitError(f"k={k} is larger than {where} ({n} parameters)")
        values, vecs, info = top_eigenpairs(self._matvec(block), n, k, tol=tol, which=which, max_steps=max_steps,
                                            seed=seed, dtype=self.operator.dtype, device=self.operator.device,
                                            vectors=vectors)
        return TopEigen(values=values, vectors=vecs, steps=int(info["steps"]), max_residual=info["max_residual"],
                        converged=bool(info["converged"]))

    def trace(self, probes: int = 60, method: str = "hutch++", *, seed: int = 0,
              block: str | None = None) -> TraceEstimate:
        """``tr A`` with its standard error.

        Args:
            probes: number of products.
            method: ``"hutch++"`` (default) or ``"hutchinson"``.
            seed: seed of the probes.
            block: restrict to one block's diagonal block.
        """
        return estimate_trace(self._matvec(block), self.operator.block_size(block), probes, method, seed=seed,
                              dtype=self.operator.dtype, device=self.operator.device)

    def density(self, steps: int = 60, probes: int = 8, *, seed: int = 0, grid_points: int = 2000,
                sigma: float | None = None, deflate: int | None = None, method: str = "auto",
                block: str | None = None) -> Density:
        """The eigenvalue density: stochastic Lanczos quadrature, or exact for small blocks.

        Args:
            steps: Lanczos steps per probe.
            probes: number of random probes.
            seed: seed of the probes.
            grid_points: points of the returned grid.
            sigma: Gaussian smoothing width (default 0.2% of the spectrum's spread).
            deflate: largest-magnitude eigenpairs taken exactly, the probes sampling the rest
                (default ``min(10, n // 10)``; 0 is plain SLQ).
            method: ``"slq"``; ``"exact"`` (all ``n`` eigenvalues from the ``n`` columns); or
                ``"auto"`` (default): exact when that costs no more products than the
                quadrature (``n ≤ steps · probes``) and ``n ≤ 4096``, else SLQ
                (:mod:`.density`).
            block: restrict to one block's diagonal block.
        """
        if method not in DENSITY_METHODS:
            raise SpectrakitError(f"method={method!r} must be one of {', '.join(DENSITY_METHODS)}")
        n = self.operator.block_size(block)
        if method == "exact" or (method == "auto" and n <= min(steps * probes, EXACT_LIMIT)):
            return exact_density(self._matvec(block), n, grid_points=grid_points, sigma=sigma,
                                 dtype=self.operator.dtype, device=self.operator.device)
        deflate = min(10, n // 10) if deflate is None else deflate
        return slq_density(self._matvec(block), n, steps, probes, seed=seed, grid_points=grid_points, sigma=sigma,
                           deflate=deflate, dtype=self.operator.dtype, device=self.operator.device)

    def gradient(self, block: str | None = None) -> torch.Tensor:
        """The loss gradient averaged over the batches (flat).

        Args:
            block: restrict to one block.
        """
        return self.operator.gradient(block)

    def alignment(self, k: int = 10, tol: float = 1e-4, *, seed: int = 0, block: str | None = None) -> float:
        """Share ``‖Pₖg‖²/‖g‖²`` of the gradient in the top-``k`` eigenspace
        (:func:`~.alignment.gradient_alignment`).

        Args:
            k: dimension of the eigenspace.
            tol: Lanczos tolerance of the eigenvectors.
            seed: seed of the start vector.
            block: restrict to one block.
        """
        top = self.top(k, tol, vectors=True, seed=seed, block=block)
        assert top.vectors is not None
        return gradient_alignment(self.gradient(block), top.vectors)

    def per_layer(self, k: int = 1, tol: float = 1e-4, *, trace_probes: int = 30, trace: bool = True,
                  method: str = "hutch++", seed: int = 0, progress: bool = False) -> SpectrumTable:
        """One row per block: its top eigenvalue(s) and trace, from the block's diagonal block.

        Args:
            k: eigenvalues per block (``top_eigenvalue`` is the largest; ``top_eigenvalues`` lists them).
            tol: Lanczos tolerance.
            trace_probes: products for each block's trace.
            trace: also estimate each block's trace.
            method: trace method.
            seed: seed of every block's vectors.
            progress: show a progress bar.
        """
        rows = []
        blocks = list(self.operator.blocks.items())
        for name, members in progress_bar(blocks, total=len(blocks), desc=f"{self.kind} per layer",
                                          enabled=progress, unit="block"):
            n = self.operator.block_size(name)
            row: dict[str, Any] = {"name": name, "parameters": ";".join(self.operator.names[i] for i in members),
                                   "params": n, "kind": self.kind, "status": "ok", "reason": ""}
            try:
                top = self.top(min(k, n), tol, seed=seed, block=name)
                row.update(top_eigenvalue=float(top.values[0]),
                           top_eigenvalues=";".join(repr(float(v)) for v in top.values),
                           lanczos_steps=top.steps, converged=top.converged)
                if trace:
                    estimate = self.trace(min(trace_probes, max(3, 3 * n)), method, seed=seed, block=name)
                    row.update(trace=estimate.value, trace_stderr=estimate.stderr, trace_probes=estimate.probes)
            except SpectrakitError as error:
                row.update(status="skipped", reason=str(error))
            rows.append(row)
        return SpectrumTable(rows=rows, source=f"{self.kind} per layer", display=PER_LAYER_DISPLAY)


def hessian(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], params: str | Sequence[Any] | None = None,
            kind: str = "hessian", *, forward: Forward | None = None, blocks: str = "layer",
            cache: bool = True) -> Curvature:
    """The curvature of ``loss_fn`` over ``batches`` with respect to ``params``.

    Args:
        model: the module (its current mode is used; training-mode dropout is refused,
            eval-mode dropout warned about).
        loss_fn: ``loss_fn(output, target)`` → a scalar, or per-example losses whose mean
            is the loss (``kind="fisher"`` needs those); ``output`` is the output tensor
            (``.logits`` of a Hugging Face output).
        batches: an iterable of batches, read once; by default a batch ``(x, y)`` means
            ``loss_fn(model(x), y)``.
        params: ``None`` (every trainable parameter), a name glob, or a list of names,
            globs or parameter tensors.
        kind: ``"hessian"`` (exact), ``"ggn"`` (generalized Gauss–Newton ``JᵀHJ``) or
            ``"fisher"`` (empirical Fisher).
        forward: ``forward(model, batch)`` → ``(outputs, target)`` for other batch layouts.
        blocks: ``"layer"`` (each module's parameters together, the default) or ``"parameter"``.
        cache: keep each batch's gradient graph between products (faster, more memory).

    Returns:
        A :class:`Curvature` with ``top``, ``trace``, ``density``, ``per_layer`` and ``alignment``.
    """
    return Curvature(CurvatureOperator(model, loss_fn, batches, params, kind, forward=forward, blocks=blocks,
                                       cache=cache))
