"""``spectrakit.analyze``: the spectrum of every weight matrix of a model, one row each."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from ..weights import MatrixRecord, iter_matrices
from .metrics import BASIC_METRICS
from .table import SpectrumTable


def _skip_reason_before_load(record: MatrixRecord) -> str | None:
    if record.is_meta:
        return "meta tensor: it holds no data"
    if not record.dtype.is_floating_point:
        return f"dtype {str(record.dtype).replace('torch.', '')} is not floating point"
    return None


def _skip_reason(matrix: torch.Tensor) -> str | None:
    rows, cols = matrix.shape
    if min(rows, cols) < 2:
        return f"degenerate {rows}x{cols} matrix: a single singular value has no spectrum"
    if not bool(torch.isfinite(matrix).all()):
        return "contains NaN or Inf values"
    if not bool(matrix.any()):
        return "all-zero matrix"
    return None


def _base_row(record: MatrixRecord) -> dict[str, Any]:
    shape = tuple(record.shape)
    rows, cols = shape[0], 1
    for size in shape[1:]:
        cols *= size
    return {
        "name": record.name,
        "kind": record.kind,
        "shape": "x".join(map(str, shape)),
        "rows": rows,
        "cols": cols,
        "dtype": str(record.dtype).replace("torch.", ""),
        "params": record.numel,
        "aliases": ";".join(record.aliases),
        "status": "ok",
        "reason": "",
    }


def analyze_record(record: MatrixRecord, method: str = "auto",
                   dtype: torch.dtype | None = None) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One table row and the singular values of ``record`` (``None`` when skipped).

    Never raises for a bad tensor: the reason goes into the row instead.
    """
    row = _base_row(record)
    reason = _skip_reason_before_load(record)
    spectrum = None
    if reason is None:
        try:
            matrix = record.matrix()
            reason = _skip_reason(matrix)
            if reason is None:
                spectrum = linalg.svdvals(matrix, method=method, dtype=dtype).double().cpu()
        except SpectrakitError as error:
            reason = str(error)
    if spectrum is None:
        row.update(status="skipped", reason=reason)
        return row, None
    row["sigma_max"] = float(spectrum[0])
    for name, metric in BASIC_METRICS.items():
        row[name] = metric(spectrum)
    return row, spectrum


def analyze(source: Any, *, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, method: str = "auto",
            dtype: torch.dtype | None = None, progress: bool = True,
            keep_spectra: bool = True) -> SpectrumTable:
    """Analyze the singular spectrum of every weight matrix in ``source``.

    Args:
        source: an ``nn.Module``, a state dict, a ``.safetensors``/``.bin``/``.pt`` file
            or a Hugging Face checkpoint folder (sharded or not).
        include, exclude: name patterns (fnmatch; no wildcard means substring).
        method: spectrum method of :func:`spectrakit.linalg.svdvals` (``auto`` uses the
            Gram matrix for large matrices; ``exact`` for full relative accuracy of the
            smallest singular values, which the condition number depends on).
        dtype: compute dtype, e.g. ``torch.float64``.
        progress: show a progress bar on stderr.
        keep_spectra: keep each matrix's singular values in ``table.spectra``.

    Returns:
        A :class:`SpectrumTable`: one row per matrix with ``sigma_max``,
        ``frobenius_norm``, ``stable_rank``, ``effective_rank``, ``spectral_entropy``
        and ``condition_number``. Bad tensors (NaN/Inf, all-zero, integer, meta,
        ``1×n``) keep a row with ``status="skipped"`` and the ``reason``.

    >>> import torch, spectrakit as sk
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> table = sk.analyze(model, progress=False)
    >>> [row["shape"] for row in table]
    ['32x16', '4x32']
    """
    if method not in linalg.METHODS:
        raise SpectrakitError(f"method={method!r} is not one of {', '.join(linalg.METHODS)}")
    records = list(iter_matrices(source, include=include, exclude=exclude))
    rows, spectra = [], {}
    for record in progress_bar(records, total=len(records), desc="spectra", enabled=progress):
        row, spectrum = analyze_record(record, method=method, dtype=dtype)
        rows.append(row)
        if spectrum is not None and keep_spectra:
            spectra[record.name] = spectrum
    label = source if isinstance(source, str) else getattr(source, "__fspath__", lambda: type(source).__name__)()
    return SpectrumTable(rows=rows, source=str(label), spectra=spectra)
