"""Scalar summaries of a singular spectrum ``σ₁ ≥ σ₂ ≥ … ≥ 0``.

Each function takes the descending singular values (a 1-D tensor, any float dtype)
and returns a Python float. None of them computes a spectrum: that is
:mod:`spectrakit.linalg`'s job.

>>> import torch
>>> S = torch.tensor([3.0, 2.0, 1.0])
>>> round(stable_rank(S), 4)          # (9 + 4 + 1) / 9
1.5556
>>> round(effective_rank(torch.ones(4)), 4)
4.0
"""

from __future__ import annotations

import math

import torch


def frobenius_norm(S: torch.Tensor) -> float:
    """‖W‖_F = √Σσᵢ² of the singular values ``S``."""
    return float(S.double().square().sum().sqrt())


def stable_rank(S: torch.Tensor) -> float:
    """‖W‖_F² / σ₁² of the singular values ``S``: a rank that moves smoothly with the spectrum (1 ≤ it ≤ rank)."""
    S = S.double()
    return float(S.square().sum() / S[0].square())


def spectral_entropy(S: torch.Tensor) -> float:
    """Shannon entropy (nats) of ``pᵢ = σᵢ / Σσ`` over the singular values ``S``."""
    p = S.double() / S.double().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_rank(S: torch.Tensor) -> float:
    """exp(spectral entropy) (Roy & Vetterli, 2007): ``k`` for ``k`` equal singular values.

    Args:
        S: the singular values.
    """
    return math.exp(spectral_entropy(S))


def condition_number(S: torch.Tensor) -> float:
    """σ₁ / σ_min of the given values; ``nan`` when σ_min is 0.

    A computed spectrum's σ_min is only as good as its method resolves it (a float32 Gram
    spectrum clamps everything below about 3e-2·σ₁ to noise or 0), so ``analyze`` reports
    the condition number through :func:`spectrakit.analyze.conditioning.conditioning_metrics`,
    which refines or marks it; this function trusts ``S`` as given.
    """
    smallest = float(S[-1])
    return math.nan if smallest <= 0 else float(S[0]) / smallest


BASIC_METRICS = {
    "frobenius_norm": frobenius_norm,
    "stable_rank": stable_rank,
    "effective_rank": effective_rank,
    "spectral_entropy": spectral_entropy,
}
