"""Metrics of training itself, measured live by :class:`~spectrakit.analyze.SpectralMonitor`.

* **intruder dimensions against the start of training**: the ``intruders`` column of
  :func:`~spectrakit.analyze.compare_matrices` between a layer's weights at the start
  (a copy taken when the monitor is built) and now — new top singular directions with
  ``maxᵢ |⟨uⱼ, u⁰ᵢ⟩| < ε`` (Shuttleworth et al.);
* **power-law alpha**: the ESD tail exponent exactly as :func:`~spectrakit.analyze`
  reports it (same spectrum method, same KS choice of ``x_min``);
* **sharpness** ``λ_max(H)`` and **gradient alignment** ``‖Pₖg‖²/‖g‖²`` of the loss on
  fixed batches (:func:`~spectrakit.analyze.hessian`).

>>> import torch
>>> W0 = torch.randn(32, 16, dtype=torch.float64)
>>> intruder_count(W0, W0.clone())
0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .compare import compare_matrices
from .run import AnalyzeOptions, matrix_metrics

_ALPHA_OPTIONS = AnalyzeOptions(farms=False)


def intruder_count(start: torch.Tensor, current: torch.Tensor, k: int = 10, epsilon: float = 0.5) -> int:
    """Intruder dimensions of ``current`` against ``start`` (as :func:`~spectrakit.compare` counts them).

    Args:
        start: the weights at the start of training.
        current: the weights now.
        k: top singular vectors of ``current`` tested.
        epsilon: similarity threshold.
    """
    return int(compare_matrices(start, current, k=k, epsilon=epsilon)["intruders"])


def spectrum_alpha(matrix: torch.Tensor) -> float:
    """The ESD power-law ``alpha`` of ``matrix`` as :func:`~spectrakit.analyze` computes it
    (``nan`` when the matrix has no spectrum to fit).

    Args:
        matrix: a 2-D weight matrix.
    """
    metrics, _, _ = matrix_metrics(matrix, _ALPHA_OPTIONS)
    value = metrics.get("alpha")
    return float(value) if isinstance(value, (int, float)) else math.nan


def curvature_metrics(model: nn.Module, loss_fn: Any, batches: Sequence[Any], *, forward: Any = None,
                      params: Any = None, k: int = 5, tol: float = 1e-3, alignment: bool = True,
                      seed: int = 0) -> dict[str, float]:
    """``{"sharpness": λ_max(H), "alignment": ‖Pₖg‖²/‖g‖²}`` of the loss on ``batches``, with the
    model in eval mode for the measurement (restored afterwards), so dropout does not make
    the products random.

    Args:
        model: the module being trained.
        loss_fn: ``loss_fn(output, target)`` as for :func:`~spectrakit.analyze.hessian`.
        batches: fixed batches to measure on.
        forward: ``forward(model, batch)`` → ``(outputs, target)``.
        params: parameter selection (default: all trainable).
        k: dimension of the eigenspace for the alignment.
        tol: Lanczos tolerance.
        alignment: also measure the alignment (needs ``k`` eigenvectors).
        seed: Lanczos start vector seed.
    """
    from .curvature import gradient_alignment, hessian

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="model is in eval mode and has dropout")
            curvature = hessian(model, loss_fn, batches, params=params, forward=forward)
        k = min(k, curvature.size)
        top = curvature.top(k if alignment else 1, tol, vectors=alignment, seed=seed)
        values = {"sharpness": float(top.values[0])}
        if alignment:
            assert top.vectors is not None
            values["alignment"] = gradient_alignment(curvature.gradient(), top.vectors)
        curvature.operator.release()
        return values
    finally:
        model.train(was_training)
