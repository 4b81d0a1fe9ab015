"""``spectrakit.compare``: how a fine-tuned model's spectrum departs from its base.

Per matrix pair ``W₀`` (base) and ``W₁`` (tuned), with ``W = U Σ Vᵀ``:

* **intruder dimensions** (Shuttleworth et al., "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence"): among the top-``k`` left singular vectors ``u¹ⱼ`` of ``W₁``,
  those with ``maxᵢ |⟨u¹ⱼ, u⁰ᵢ⟩| < ε`` over *every* left singular vector of ``W₀``
  — new high-ranking directions the base never had;
* ``‖ΔW‖_F``, ``‖ΔW‖₂``, ``‖ΔW‖_F/‖W₀‖_F`` and the effective rank of ``ΔW = W₁ − W₀``;
* principal angles between the top-``k`` left subspaces: ``cos θᵢ = σᵢ(U⁰ₖᵀ U¹ₖ)``.

>>> import torch, spectrakit as sk
>>> base = torch.nn.Linear(64, 64)
>>> tuned = torch.nn.Linear(64, 64)
>>> _ = tuned.load_state_dict(base.state_dict())
>>> table = sk.compare(base, tuned, progress=False)
>>> table.rows[0]["intruders"]
0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError, SpectrakitWarning
from ..weights import MatrixRecord, iter_matrices
from .checks import check_selection
from .metrics import effective_rank
from .run import base_row, skip_reason
from .table import SpectrumTable

COMPARE_DISPLAY = (
    ("name", "name"), ("shape", "shape"), ("intruders", "intruders"),
    ("delta_fro_relative", "‖ΔW‖/‖W₀‖"), ("delta_spectral_norm", "‖ΔW‖₂"),
    ("delta_effective_rank", "eff. rank ΔW"), ("max_principal_angle_deg", "max angle°"),
    ("status", "status"),
)


def intruder_dimensions(U_base: torch.Tensor, U_tuned_top: torch.Tensor,
                        epsilon: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of intruder dimensions among ``U_tuned_top``'s columns, and every
    column's best cosine similarity to the columns of ``U_base``.

    Args:
        U_base: the base matrix's left singular vectors (columns).
        U_tuned_top: the tuned matrix's top-k left singular vectors.
        epsilon: the similarity threshold: a column whose best cosine similarity is below it is an intruder.
    """
    best = (U_base.mT @ U_tuned_top).abs().amax(dim=0)
    return torch.nonzero(best < epsilon).flatten(), best


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal ``A`` and ``B``."""
    cosines = linalg.svdvals(A.mT @ B, method="exact").clamp(-1.0, 1.0)
    return torch.arccos(cosines)


def compare_matrices(base: torch.Tensor, tuned: torch.Tensor, k: int = 10, epsilon: float = 0.5,
                     dtype: torch.dtype | None = torch.float64) -> dict[str, Any]:
    """The comparison metrics of one matrix pair (see the module docstring).

    Args:
        base: the base weight (``out × in``).
        tuned: the fine-tuned weight, of the same shape.
        k: how many of the tuned matrix's top singular vectors to test for intruders.
        epsilon: the cosine similarity below which a direction is an intruder.
        dtype: the dtype the SVDs are computed in (float64 by default).
    """
    if base.shape != tuned.shape:
        raise SpectrakitError(f"shapes differ: base {tuple(base.shape)}, tuned {tuple(tuned.shape)}")
    k = min(k, min(base.shape))
    U_base, _, _ = linalg.svd(base, method="exact", dtype=dtype)
    U_tuned, S_tuned, _ = linalg.svd(tuned, k=k, method="exact", dtype=dtype)
    intruders, best = intruder_dimensions(U_base, U_tuned, epsilon)
    angles = principal_angles(U_base[:, :k], U_tuned)
    delta = tuned.to(U_base.dtype) - base.to(U_base.dtype)
    base_norm = float(base.to(U_base.dtype).norm())
    row: dict[str, Any] = {
        "intruders": int(intruders.numel()),
        "intruder_indices": ";".join(str(int(i)) for i in intruders),
        "min_best_similarity": float(best.min()),
        "delta_fro_norm": float(delta.norm()),
        "delta_fro_relative": float(delta.norm()) / base_norm if base_norm > 0 else math.inf,
        "max_principal_angle_deg": math.degrees(float(angles.max())),
        "mean_principal_cos2": float(torch.cos(angles).square().mean()),
    }
    if bool(delta.any()):
        delta_spectrum = linalg.svdvals(delta, method="exact")
        row["delta_spectral_norm"] = float(delta_spectrum[0])
        row["delta_effective_rank"] = effective_rank(delta_spectrum)
    else:
        row["delta_spectral_norm"] = 0.0
        row["delta_effective_rank"] = 0.0
    return row


def _pair_row(base: MatrixRecord | None, tuned: MatrixRecord, k: int, epsilon: float) -> dict[str, Any]:
    row = base_row(tuned)
    if base is None:
        row.update(status="skipped", reason="not present in the base model")
        return row
    try:
        base_matrix, tuned_matrix = base.matrix(), tuned.matrix()
        reason = None
        if tuple(base_matrix.shape) != tuple(tuned_matrix.shape):
            reason = (f"shape differs: base {'x'.join(map(str, base.shape))}, "
                      f"tuned {'x'.join(map(str, tuned.shape))}")
        for label, matrix in (("base", base_matrix), ("tuned", tuned_matrix)):
            if reason is None and not matrix.dtype.is_floating_point:
                reason = f"{label}: dtype {matrix.dtype} is not floating point"
            if reason is None and (problem := skip_reason(matrix)) is not None:
                reason = f"{label}: {problem}"
        if reason is None:
            row.update(compare_matrices(base_matrix, tuned_matrix, k=k, epsilon=epsilon))
    except SpectrakitError as error:
        reason = str(error)
    if reason is not None:
        row.update(status="skipped", reason=reason)
    return row


def compare(base: Any, tuned: Any, *, k: int = 10, epsilon: float = 0.5,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
            progress: bool = True) -> SpectrumTable:
    """Compare every matrix of ``tuned`` with the same-named matrix of ``base``.

    Args:
        include: name glob(s) of the matrices to compare (default: all).
        exclude: name glob(s) to leave out.
        progress: show a progress bar.
        base, tuned: models, state dicts, files or folders (anything ``iter_matrices`` reads).
        k: how many of the tuned matrix's top singular vectors to test (default 10).
        epsilon: similarity threshold below which a direction counts as an intruder.

    Returns:
        A :class:`SpectrumTable` with one row per tuned matrix: ``intruders``,
        ``intruder_indices``, ``delta_fro_norm``, ``delta_fro_relative``,
        ``delta_spectral_norm``, ``delta_effective_rank``, ``max_principal_angle_deg``,
        ``mean_principal_cos2``; unmatched or bad pairs are skipped with a reason.
    """
    if not 0 < epsilon <= 1:
        raise SpectrakitError(f"epsilon={epsilon} must lie in (0, 1]")
    if k < 1:
        raise SpectrakitError(f"k={k} must be ≥ 1")
    base_records = {record.name: record for record in iter_matrices(base, include=include, exclude=exclude)}
    for record in list(base_records.values()):
        for alias in record.aliases:
            base_records.setdefault(alias, record)
    tuned_records = list(iter_matrices(tuned, include=include, exclude=exclude))
    check_selection(tuned, tuned_records, include, exclude)
    rows = []
    for record in progress_bar(tuned_records, total=len(tuned_records), desc="compare", enabled=progress):
        counterpart = base_records.get(record.name)
        if counterpart is None:
            counterpart = next((base_records[a] for a in record.aliases if a in base_records), None)
        rows.append(_pair_row(counterpart, record, k, epsilon))
    _check_related(rows, _label(base), _label(tuned))
    return SpectrumTable(rows=rows, source=f"{_label(base)} → {_label(tuned)}", display=COMPARE_DISPLAY)


# ‖W₁ − W₀‖_F / ‖W₀‖_F of a fine-tune is a few percent; two independent draws of the same
# scale give about √2, so a median above 1 means TUNED did not start from BASE
UNRELATED_RELATIVE_DELTA = 1.0


def _check_related(rows: list[dict[str, Any]], base: str, tuned: str) -> None:
    """Raise when no tuned matrix has a counterpart in ``base``; warn when the pairs differ by
    more than a fine-tune would (:data:`UNRELATED_RELATIVE_DELTA`) or many have no counterpart."""
    if not rows:
        return
    compared = [row for row in rows if row["status"] == "ok"]
    unmatched = [row for row in rows if row["reason"] == "not present in the base model"
                 or str(row["reason"]).startswith("shape differs")]
    if not compared and len(unmatched) == len(rows):
        raise SpectrakitError(f"none of the {len(rows)} matrices of {tuned} has a same-named, same-shaped "
                              f"matrix in {base} (e.g. {rows[0]['name']}): not a fine-tune of it?")
    if unmatched:
        warnings.warn(f"{len(unmatched)} of the {len(rows)} matrices of {tuned} have no same-named, same-shaped "
                      f"matrix in {base} (e.g. {unmatched[0]['name']}) and are skipped", SpectrakitWarning,
                      stacklevel=3)
    relative = sorted(row["delta_fro_relative"] for row in compared)
    if relative and relative[len(relative) // 2] > UNRELATED_RELATIVE_DELTA:
        warnings.warn(f"the median ‖ΔW‖_F/‖W₀‖_F over {len(relative)} matrices is "
                      f"{relative[len(relative) // 2]:.2f}: {tuned} does not look like a fine-tune of {base} "
                      "(unrelated models?), so intruder dimensions mean little here", SpectrakitWarning,
                      stacklevel=3)


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else type(source).__name__
