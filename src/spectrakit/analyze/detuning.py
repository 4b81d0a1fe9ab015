"""Spectral DeTuning (Horwitz, Kahana & Hoshen, *Recovering the Pre-Fine-Tuning Weights of
Generative Models*, 2024): the base weights from several LoRA fine-tunes of one base.

Each fine-tune is ``Wᵢ = W* + Mᵢ`` with ``rank Mᵢ ≤ r``. Alternate, from ``W = mean Wᵢ``:

    Mᵢ ← best rank-r approximation of (Wᵢ − W)      (truncated SVD, for every i)
    W  ← mean over i of (Wᵢ − Mᵢ)

until ``W`` stops moving. Each step cannot increase ``Σᵢ ‖Wᵢ − W − Mᵢ‖_F²``; with a few
more fine-tunes than needed to pin down ``W*`` it converges to the base.
:func:`detune` recovers one matrix, :func:`spectral_detuning` every shared matrix of
several models (a state dict to hand to :func:`~spectrakit.compare`).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> base = torch.randn(40, 30, generator=g, dtype=torch.float64)
>>> tuned = [base + torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g,
...          dtype=torch.float64) for _ in range(6)]
>>> recovered = detune(tuned, rank=2).weight
>>> bool((recovered - base).norm() < 1e-6 * base.norm())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from ..weights import iter_matrices


@dataclass
class DetuneResult:
    """The recovered base matrix, the iterations used and the last relative change."""

    weight: torch.Tensor
    iterations: int
    change: float


def _low_rank(X: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = linalg.svd(X, k=rank, method="exact")
    return (U * S) @ Vh


def detune(tuned: Sequence[torch.Tensor], rank: int, *, iterations: int = 500, tol: float = 1e-10) -> DetuneResult:
    """Recover the shared base of several rank-``rank`` fine-tunes of one matrix.

    Args:
        tuned: the fine-tuned matrices (at least two, same shape).
        rank: the LoRA rank ``r`` of each fine-tune's update.
        iterations: most alternating steps.
        tol: stop when ``‖W_new − W‖_F ≤ tol · ‖W‖_F``.
    """
    if len(tuned) < 2:
        raise SpectrakitError(f"Spectral DeTuning needs at least 2 fine-tunes, got {len(tuned)}")
    shapes = {tuple(t.shape) for t in tuned}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise SpectrakitError(f"fine-tuned matrices must share one 2-D shape, got {sorted(shapes)}")
    if not 1 <= rank < min(next(iter(shapes))):
        raise SpectrakitError(f"rank={rank} must lie in [1, {min(next(iter(shapes)))})")
    stack = torch.stack([t.detach().double() for t in tuned])
    W = stack.mean(dim=0)
    change, used = float("inf"), 0
    while used < iterations and change > tol:
        updates = torch.stack([_low_rank(Wi - W, rank) for Wi in stack])
        new = (stack - updates).mean(dim=0)
        change = float((new - W).norm()) / max(float(new.norm()), 1e-300)
        W, used = new, used + 1
    return DetuneResult(weight=W.to(tuned[0].dtype), iterations=used, change=change)


def spectral_detuning(sources: Sequence[Any], rank: int, *, iterations: int = 500, tol: float = 1e-10,
                      include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """The recovered base of every matrix the fine-tuned ``sources`` share (merged LoRA weights).

    Args:
        sources: fine-tuned models, state dicts, files or folders (anything ``iter_matrices`` reads).
        rank: the LoRA rank of the fine-tunes.
        iterations, tol: as for :func:`detune`.
        include, exclude: name patterns selecting the matrices (e.g. the LoRA targets).
        progress: show a progress bar.

    Returns:
        ``{name: recovered matrix}``, ready for ``sk.compare(recovered, true_base)``.
    """
    if len(sources) < 2:
        raise SpectrakitError(f"Spectral DeTuning needs at least 2 fine-tuned models, got {len(sources)}")
    tables = [{r.name: r for r in iter_matrices(source, include=include, exclude=exclude)} for source in sources]
    shared = [name for name in tables[0] if all(name in table for table in tables[1:])]
    if not shared:
        raise SpectrakitError("the fine-tuned models share no weight matrix")
    recovered = {}
    for name in progress_bar(shared, total=len(shared), desc="detune", enabled=progress):
        matrices = [table[name].matrix() for table in tables]
        recovered[name] = detune(matrices, rank, iterations=iterations, tol=tol).weight
    return recovered
