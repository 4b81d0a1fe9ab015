"""The spectral condition for feature learning (Yang, Simon & Bernstein, *A Spectral
Condition for Feature Learning*, 2023).

Features evolve at the right rate, in every layer and at every width, when each
weight matrix and each of its updates have spectral norms of the order

    ‖W‖₂ = Θ(√(fan_out / fan_in))   and   ‖ΔW‖₂ = Θ(√(fan_out / fan_in)).

Per matrix this reports the target ``√(fan_out/fan_in)``, ``σ₁(W)`` and (given a base)
``σ₁(ΔW)`` with ``ΔW = W − W_base``, their ratios to the target, and a verdict:
``"ok"`` when the ratio lies within ``[1/band, band]``, else ``"too small"`` /
``"too large"``. Θ(·) fixes no constant, so ``band`` (default 4) is a reading aid, not
part of the condition; the ratios are what to compare across layers and widths.

>>> import torch
>>> W = torch.nn.Linear(64, 16, bias=False)
>>> with torch.no_grad():
...     _ = W.weight.copy_(torch.linalg.qr(torch.randn(64, 16)).Q.T * 0.5)   # σ₁ = √(16/64)
>>> row = spectral_condition(W, progress=False).rows[0]
>>> round(row["sigma_ratio"], 6), row["verdict"]
(1.0, 'ok')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from ..weights import iter_matrices
from .run import base_row, skip_reason
from .table import SpectrumTable

CONDITION_DISPLAY = (
    ("name", "name"), ("shape", "shape"), ("target", "√(out/in)"), ("sigma_max", "σ₁(W)"),
    ("sigma_ratio", "σ₁/target"), ("delta_sigma_max", "σ₁(ΔW)"), ("delta_ratio", "σ₁(ΔW)/target"),
    ("verdict", "verdict"), ("status", "status"),
)


def verdict(ratio: float, band: float) -> str:
    """``"ok"``, ``"too small"`` or ``"too large"`` for a ratio to the target.

    Args:
        ratio: ``σ₁ / √(fan_out/fan_in)``.
        band: the accepted factor either side of 1.
    """
    if not math.isfinite(ratio):
        return "undefined"
    if ratio < 1 / band:
        return "too small"
    return "too large" if ratio > band else "ok"


def spectral_condition(source: Any, base: Any = None, *, band: float = 4.0,
                       include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                       progress: bool = True) -> SpectrumTable:
    """Check every weight matrix of ``source`` (and its update from ``base``) against the condition.

    Args:
        source: a model, state dict, file or folder (anything ``iter_matrices`` reads).
        base: the weights before the update (e.g. at initialization); adds ``σ₁(ΔW)``.
        band: factor either side of the target inside which the verdict is ``"ok"``.
        include, exclude: name patterns selecting the matrices.
        progress: show a progress bar.

    Returns:
        A :class:`SpectrumTable`; ``verdict`` judges ``ΔW`` when a base is given, ``W`` otherwise.
    """
    if not band > 1:
        raise SpectrakitError(f"band={band} must be > 1")
    base_records = ({r.name: r for r in iter_matrices(base, include=include, exclude=exclude)}
                    if base is not None else {})
    records = list(iter_matrices(source, include=include, exclude=exclude))
    rows = []
    for record in progress_bar(records, total=len(records), desc="spectral condition", enabled=progress):
        row = base_row(record)
        try:
            W = record.matrix()
            reason = skip_reason(W) if W.dtype.is_floating_point else f"dtype {W.dtype} is not floating point"
            if reason is not None:
                row.update(status="skipped", reason=reason)
                rows.append(row)
                continue
            fan_out, fan_in = W.shape
            target = math.sqrt(fan_out / fan_in)
            sigma = float(linalg.svdvals(W, k=1)[0])
            row.update(fan_in=fan_in, fan_out=fan_out, target=target, sigma_max=sigma, sigma_ratio=sigma / target)
            judged = row["sigma_ratio"]
            if base is not None:
                counterpart = base_records.get(record.name)
                if counterpart is None:
                    raise SpectrakitError("not present in the base")
                W0 = counterpart.matrix()
                if W0.shape != W.shape:
                    raise SpectrakitError(f"base shape {tuple(W0.shape)} differs from {tuple(W.shape)}")
                delta = W.double() - W0.double()
                delta_sigma = float(linalg.svdvals(delta, k=1)[0]) if bool(delta.any()) else 0.0
                row.update(delta_sigma_max=delta_sigma, delta_ratio=delta_sigma / target)
                judged = row["delta_ratio"]
            row["verdict"] = verdict(judged, band)
        except SpectrakitError as error:
            row.update(status="skipped", reason=str(error))
        rows.append(row)
    return SpectrumTable(rows=rows, source=str(type(source).__name__), display=CONDITION_DISPLAY)
