"""The weightwatcher-parity metrics of one matrix's empirical spectral density (ESD).

With ``λᵢ = σᵢ²`` (the eigenvalues of ``WᵀW``, ``min(N, M)`` of them, unnormalized as
in weightwatcher 0.7.7):

* ``alpha`` — power-law exponent of the ESD tail, ``x_min`` by KS distance
  (:func:`~spectrakit.analyze.powerlaw.fit_power_law`); with ``xmin``, ``xmax``,
  ``ks_distance`` and ``num_pl_spikes`` (the tail size);
* ``log_norm = log₁₀ Σλ`` (= log₁₀ ‖W‖_F²), ``spectral_norm = λ_max`` (= σ₁², the
  weightwatcher convention; ``sigma_max`` is σ₁), ``log_spectral_norm = log₁₀ λ_max``;
* ``alpha_weighted = alpha · log₁₀ λ_max`` and ``log_alpha_norm = log₁₀ Σλ^alpha``;
* ``num_spikes``, ``mp_softrank``, ``mp_bulk_max`` from the Marchenko–Pastur bulk
  (by default :func:`~spectrakit.analyze.marchenko_pastur.fit_marchenko_pastur`, the bulk
  scale matched to the ESD's lower quantiles; ``mp_fit="iterative"`` the bulk-mean fixed
  point; ``mp_fit="weightwatcher"`` weightwatcher's own procedure,
  :func:`~spectrakit.analyze.marchenko_pastur.fit_marchenko_pastur_weightwatcher`).

``stable_rank = Σλ / λ_max`` is already among the basic metrics.

>>> import torch
>>> row = esd_metrics(torch.tensor([2.0, 1.0, 1.0]), rows=3, cols=3)
>>> row["spectral_norm"], round(row["log_norm"], 4)        # 4, log10(4 + 1 + 1)
(4.0, 0.7782)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .marchenko_pastur import DEFAULT_MP_FIT, mp_fit_function
from .powerlaw import fit_power_law


def esd_metrics(singular_values: torch.Tensor, rows: int, cols: int, *,
                xmin: str | float = "ks", mp_fit: str = DEFAULT_MP_FIT) -> dict[str, Any]:
    """The ESD metrics of a ``rows × cols`` matrix from its singular values.

    Args:
        singular_values: the matrix's singular values (any order).
        rows, cols: its shape (the Marchenko–Pastur fit needs the aspect ratio).
        xmin: the power-law x_min rule (``"ks"``, ``"median"`` or a number).
        mp_fit: the Marchenko–Pastur bulk fit, a key of ``MP_FITS``.
    """
    evals = singular_values.detach().to(torch.float64).square()
    total = float(evals.sum())
    lambda_max = float(evals.max())
    fit = fit_power_law(evals, xmin=xmin)
    log_spectral_norm = math.log10(lambda_max)
    row: dict[str, Any] = fit.as_row()
    row.update({
        "alpha_weighted": fit.alpha * log_spectral_norm,
        "log_alpha_norm": _log_alpha_norm(evals, fit.alpha),
        "log_norm": math.log10(total),
        "spectral_norm": lambda_max,
        "log_spectral_norm": log_spectral_norm,
    })
    row.update(mp_fit_function(mp_fit)(evals, rows=rows, cols=cols).as_row())
    return row


def _log_alpha_norm(evals: torch.Tensor, alpha: float) -> float:
    """log₁₀ Σ λ^α, summed in log space so large α cannot overflow."""
    if not math.isfinite(alpha):
        return math.nan
    positive = evals[evals > 0]
    return float(torch.logsumexp(alpha * positive.log(), dim=0)) / math.log(10)
