"""Requests ``analyze`` could carry out but that probably do not mean what was asked.

Each check either raises :class:`~spectrakit.errors.SpectrakitError` before any matrix is
read (nothing useful could come out) or warns with
:class:`~spectrakit.errors.SpectrakitWarning` (the work goes on; the message says what
happened), instead of a silent "0 matrices analyzed" or an alpha fitted to two eigenvalues:

* :func:`check_selection` — ``include``/``exclude`` that leave none of the source's matrices;
* :func:`check_conv_input` — a ``conv_input_shape`` whose number of sizes fits none of the
  conv layers (a 1-D size for Conv2d), or a source with no conv layer at all;
* :func:`warn_xmin_outside` — a fixed power-law ``xmin`` above (alpha not fitted) or below
  (the whole ESD fitted) some matrices' spectra.

>>> import torch, warnings
>>> from spectrakit.weights import iter_matrices
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> check_selection(model, [], ["attn"], None)
Traceback (most recent call last):
...
spectrakit.errors.SpectrakitError: include ['attn'] matches none of the 1 matrices (names such as 0.weight)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import SpectrakitError, SpectrakitWarning
from ..weights import MatrixRecord, iter_matrices

_CONV_KINDS = ("conv1d", "conv2d")


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_selection(source: Any, records: Sequence[MatrixRecord], include: str | Sequence[str] | None,
                    exclude: str | Sequence[str] | None) -> None:
    """Raise when ``include``/``exclude`` leave no matrix of a source that has some.

    Args:
        source: what ``records`` were read from.
        records: the matrices left after ``include``/``exclude``.
        include, exclude: the name patterns.
    """
    if records or (include is None and exclude is None):
        return
    every = [record.name for record in iter_matrices(source)]
    if not every:
        return
    examples = ", ".join(every[:3]) + (", …" if len(every) > 3 else "")
    if include is not None and not list(iter_matrices(source, include=include)):
        raise SpectrakitError(f"include {_patterns(include)} matches none of the {len(every)} matrices "
                              f"(names such as {examples})")
    raise SpectrakitError(f"include {_patterns(include)} and exclude {_patterns(exclude)} leave none of the "
                          f"{len(every)} matrices (names such as {examples})")


def check_conv_input(records: Sequence[MatrixRecord], shape: Sequence[int] | None) -> None:
    """Raise when ``shape`` (``conv_input_shape``) fits none of the conv layers; warn when it
    fits only some (the others are skipped) or when there is no conv layer to apply it to.

    Args:
        records: the matrices to analyze.
        shape: the input size, ``(L,)`` for Conv1d or ``(H, W)`` for Conv2d.
    """
    if shape is None:
        return
    size = "x".join(str(s) for s in shape)
    conv = [r for r in records if r.kind in _CONV_KINDS]
    if not conv:
        warnings.warn(f"conv input {size} has no effect: none of the {len(records)} matrices is a conv layer",
                      SpectrakitWarning, stacklevel=3)
        return
    fitting = [r for r in conv if len(r.shape) - 2 == len(shape)]
    if not fitting:
        dims = sorted({len(r.shape) - 2 for r in conv})
        wanted = " or ".join(f"{d} size{'s' if d > 1 else ''} ({'x'.join(['32'] * d)})" for d in dims)
        raise SpectrakitError(f"conv input {size} has {len(shape)} size{'s' if len(shape) > 1 else ''}, but the "
                              f"{len(conv)} conv layers (e.g. {conv[0].name}) need {wanted}")
    if len(fitting) < len(conv):
        other = next(r for r in conv if r not in fitting)
        warnings.warn(f"conv input {size} fits {len(fitting)} of the {len(conv)} conv layers; the other "
                      f"{len(conv) - len(fitting)} (e.g. {other.name}) are skipped", SpectrakitWarning, stacklevel=3)


def warn_xmin_outside(rows: Sequence[dict[str, Any]], xmin: str | float) -> None:
    """Warn when a fixed ``xmin`` lies outside some analyzed matrices' ESD.

    Args:
        rows: the table's rows (``spectral_norm`` = λ_max, ``alpha``, ``sigma_min``).
        xmin: the power-law ``xmin`` rule; only a number is checked.
    """
    if isinstance(xmin, str):
        return
    fitted = [r for r in rows if r.get("status") == "ok" and "spectral_norm" in r]
    # with a fixed xmin a fit fails when fewer than two eigenvalues reach it (see fit_power_law)
    above = [r for r in fitted if isinstance(r.get("alpha"), float) and math.isnan(r["alpha"])]
    below = [r for r in fitted if isinstance(r.get("sigma_min"), float) and r["sigma_min"] ** 2 > xmin]
    if above:
        largest = max(r["spectral_norm"] for r in above)
        warnings.warn(f"xmin={xmin:g} leaves fewer than two eigenvalues in the tail of {len(above)} of the "
                      f"{len(fitted)} matrices (e.g. {above[0]['name']}; their largest λ = σ₁² is at most "
                      f"{largest:.4g}): their alpha is not fitted (NaN)", SpectrakitWarning, stacklevel=3)
    if below:
        warnings.warn(f"xmin={xmin:g} lies below every eigenvalue of {len(below)} of the {len(fitted)} matrices "
                      f"(e.g. {below[0]['name']}): their alpha is fitted to the whole ESD", SpectrakitWarning,
                      stacklevel=3)
