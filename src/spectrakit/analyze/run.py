"""``spectrakit.analyze``: the spectrum of every weight matrix of a model, one row each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import linalg
from ..cache import SpectrumCache, as_cache
from ..errors import NonFiniteError, SpectrakitError
from ..linalg._prepare import all_finite
from ..weights import MatrixRecord, iter_matrices
from .checks import check_conv_input, check_selection, warn_xmin_outside
from .conditioning import conditioning_metrics
from .conv_slices import (
    CONV_TREATMENTS,
    degenerate_slices_reason,
    esd_shape,
    pooled_singular_values,
    slice_scale,
    tap_slices,
)
from .esd import esd_metrics
from .farms import farms_fit
from .marchenko_pastur import mp_fit_function
from .metrics import BASIC_METRICS
from .table import SpectrumTable


@dataclass(frozen=True)
class AnalyzeOptions:
    """Everything a worker needs to turn one matrix into metrics."""

    method: str = "auto"
    dtype: torch.dtype | None = None
    esd: bool = True
    xmin: str | float = "ks"
    mp_fit: str = "quantile"
    farms: bool = True
    farms_xmin: str | float = "median"
    conv_input_shape: tuple[int, ...] | None = None
    conv: str = "reshape"
    conv2d_norm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    cache: SpectrumCache | None = None  # travels to threads, workers and ranks (it pickles as its folder)
    keep_spectra: bool = True  # False: each result drops its σ and FARMS ESD (only the report plots them)

    def wants_kernel(self, kind: str) -> bool:
        """Whether this record's spectrum needs the raw kernel (conv operator or per-tap slices)."""
        return (self.conv_input_shape is not None or self.conv == "slices") and kind in _CONV_KINDS

    def conv_treatment(self, kind: str) -> str:
        """What a row of this kind used: ``reshape``, ``slices`` or ``operator`` for conv kinds, else ``""``."""
        if kind not in _CONV_KINDS:
            return ""
        return "operator" if self.conv_input_shape is not None else self.conv


_CONV_KINDS = ("conv1d", "conv2d")


@dataclass
class MatrixResult:
    """What one matrix contributes to the table: metrics or a skip reason, and its spectra."""

    name: str
    metrics: dict[str, Any]
    spectrum: torch.Tensor | None = None
    farms_spectrum: torch.Tensor | None = None


def skip_reason_before_load(record: MatrixRecord) -> str | None:
    if record.is_meta:
        return "meta tensor: it holds no data"
    if not record.dtype.is_floating_point:
        return f"dtype {str(record.dtype).replace('torch.', '')} is not floating point"
    return None


NON_FINITE = "contains NaN or Inf values"
ALL_ZERO = "all-zero matrix"


def degenerate_reason(matrix: torch.Tensor) -> str | None:
    rows, cols = matrix.shape
    if min(rows, cols) == 0:
        return f"empty {rows}x{cols} matrix: it has no singular values"
    if min(rows, cols) < 2:
        return f"degenerate {rows}x{cols} matrix: a single singular value has no spectrum"
    return None


def skip_reason(matrix: torch.Tensor) -> str | None:
    """Why ``matrix`` has no meaningful spectrum, or ``None``."""
    if (reason := degenerate_reason(matrix)) is not None:
        return reason
    if not all_finite(matrix):
        return NON_FINITE
    if not bool(matrix.any()):
        return ALL_ZERO
    return None


def base_row(record: MatrixRecord) -> dict[str, Any]:
    """The identifying columns of a record's row (no data is loaded)."""
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


def matrix_metrics(matrix: torch.Tensor, options: AnalyzeOptions,
                   kernel: torch.Tensor | None = None,
                   ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Metrics, spectrum and FARMS eigenvalues of one loaded matrix (``status/reason`` when skipped).

    ``kernel``: the raw conv kernel, when the spectrum should be that of the conv operator
    (circular padding on ``options.conv_input_shape``) or, with ``options.conv="slices"``, the
    pooled ESD of its per-tap slices (:mod:`~spectrakit.analyze.conv_slices`), rather than that
    of the reshaped matrix. FARMS follows the same choice.
    """
    slices = kernel if options.conv_input_shape is None else None  # the kernel, for conv="slices"
    # NaN/Inf and all-zero matrices show in the spectrum itself (linalg checks finiteness
    # on the Gram diagonal), which spares two full passes over every matrix
    reason = degenerate_slices_reason(slices) if slices is not None else degenerate_reason(matrix)
    if reason is not None:
        return {"status": "skipped", "reason": reason}, None, None
    try:
        if slices is not None:
            spectrum = pooled_singular_values(slices, conv2d_norm=options.conv2d_norm, method=options.method,
                                              dtype=options.dtype)
            rows, cols = esd_shape(slices)
        elif kernel is not None and options.conv_input_shape is not None:
            spectrum = linalg.conv_singular_values(kernel.to(options.dtype or torch.float32), options.conv_input_shape)
            spectrum = spectrum.double().cpu().sort(descending=True).values
            grid = spectrum.numel() // min(kernel.shape[:2])
            rows, cols = kernel.shape[0] * grid, kernel.shape[1] * grid
        else:
            spectrum = _singular_values(matrix, options).double().cpu()
            rows, cols = matrix.shape
    except NonFiniteError:
        return {"status": "skipped", "reason": NON_FINITE}, None, None
    if not spectrum[0] > 0:
        return {"status": "skipped", "reason": ALL_ZERO}, None, None
    metrics: dict[str, Any] = {"sigma_max": float(spectrum[0]), "num_evals": spectrum.numel()}
    for name, metric in BASIC_METRICS.items():
        metrics[name] = metric(spectrum)
    # σ_min from the spectrum only where its method resolves it; else refined in float64 or marked
    metrics.update(conditioning_metrics(matrix if kernel is None else None, spectrum, method=options.method,
                                        dtype=options.dtype, shape=(rows, cols)))
    if options.esd:
        metrics.update(esd_metrics(spectrum, rows, cols, xmin=options.xmin, mp_fit=options.mp_fit))
    farms_evals = None
    if options.farms:
        farms_input = matrix if slices is None else tap_slices(slices) * slice_scale(slices, options.conv2d_norm)
        fit, farms_evals = farms_fit(farms_input, method=options.method, dtype=options.dtype, xmin=options.farms_xmin)
        metrics.update(fit.as_row("farms_"))
    return metrics, spectrum, farms_evals


def _singular_values(matrix: torch.Tensor, options: AnalyzeOptions) -> torch.Tensor:
    """``linalg.svdvals`` of the matrix, through ``options.cache`` when there is one."""
    def compute() -> torch.Tensor:
        return linalg.svdvals(matrix, method=options.method, dtype=options.dtype)

    if options.cache is None:
        return compute()
    return options.cache.svdvals(matrix, compute=compute, method=f"svdvals:{options.method}:{options.dtype}")


def analyze_record(record: MatrixRecord, options: AnalyzeOptions) -> MatrixResult:
    """One matrix's result; never raises for a bad tensor (the reason goes in the row).

    Args:
        record: the matrix, as :func:`spectrakit.iter_matrices` yields it.
        options: the options of :func:`spectrakit.analyze`, resolved.
    """
    reason = skip_reason_before_load(record)
    if reason is None:
        try:
            kernel = record.load() if options.wants_kernel(record.kind) else None
            metrics, spectrum, farms_evals = matrix_metrics(record.matrix(), options, kernel)
            if not options.keep_spectra:  # a streamed run over many matrices would hold them all
                spectrum = farms_evals = None
            return MatrixResult(record.name, metrics, spectrum, farms_evals)
        except SpectrakitError as error:
            reason = str(error)
    return MatrixResult(record.name, {"status": "skipped", "reason": reason})


def _label(source: Any) -> str:
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        return str(source)
    return type(source).__name__


def analyze(source: Any, *, farms: bool = True, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, method: str = "auto",
            dtype: torch.dtype | None = None, esd: bool = True, xmin: str | float = "ks",
            farms_xmin: str | float = "median", mp_fit: str = "quantile",
            conv_input_shape: Sequence[int] | None = None, conv: str = "reshape", conv2d_norm: bool = True,
            progress: bool = True, keep_spectra: bool = True,
            workers: int = 1, threads: int | None = None, distributed: bool | None = None,
            cache: SpectrumCache | str | os.PathLike[str] | None = None) -> SpectrumTable:
    """Analyze the singular spectrum of every weight matrix in ``source``.

    Args:
        source: an ``nn.Module``, a state dict, a ``.safetensors``/``.bin``/``.pt`` file
            or a Hugging Face checkpoint folder (sharded or not).
        farms: add the FARMS fit (``farms_alpha``…) of fixed-aspect-ratio windows.
        include, exclude: name patterns (fnmatch; no wildcard means substring).
        method: spectrum method of :func:`spectrakit.linalg.svdvals` (``auto`` uses the
            Gram matrix for large matrices; ``exact`` for full relative accuracy of the
            smallest singular values, which the condition number depends on).
        dtype: compute dtype, e.g. ``torch.float64``.
        esd: add the weightwatcher-parity ESD metrics (``alpha``, ``alpha_weighted``,
            ``log_norm``, ``spectral_norm`` = σ₁², ``log_spectral_norm``, ``num_spikes``,
            ``mp_softrank``…); off leaves the basic metrics only.
        xmin: how the power-law tail starts: ``"ks"`` (weightwatcher's KS search, the
            default), ``"median"`` or a fixed value.
        farms_xmin: the same for the FARMS fit (default ``"median"``, stable on
            noise-like spectra).
        mp_fit: the Marchenko–Pastur bulk fit behind ``num_spikes``/``mp_softrank``:
            ``"quantile"`` (the default: the bulk scale matched to the lower half of the
            ESD's quantiles), ``"iterative"`` (the bulk-mean fixed point, the old default,
            which collapses on heavy-tailed layers) or ``"weightwatcher"`` (weightwatcher
            0.7.7's KDE brute-force fit, for parity; needs SciPy). See docs/diagnose.md.
        conv_input_shape: for conv layers, use the exact spectrum of the convolution
            operator with circular padding on this input size (``(H, W)`` or ``(L,)``)
            instead of the reshaped ``out × in·k`` kernel.
        conv: how a conv kernel becomes a spectrum when ``conv_input_shape`` is not given:
            ``"reshape"`` (the default: one ``out × in·k₁k₂`` matrix, the map the layer applies
            to each input patch) or ``"slices"`` (weightwatcher's treatment: one ESD pooled from
            the ``k₁k₂`` per-tap ``out × in`` slices, fitted with one slice's aspect ratio; see
            :mod:`~spectrakit.analyze.conv_slices`). The power-law, Marchenko–Pastur and FARMS
            fits all use that spectrum; each conv row's ``conv`` column says which was used.
        conv2d_norm: with ``conv="slices"``, scale Conv2d slices by √(1/2) before their SVD, as
            weightwatcher's ``conv2d_norm`` (on by default there too) does; σ₁ and the norms
            carry that factor, alpha and stable rank do not depend on it.
        progress: show a progress bar on stderr.
        keep_spectra: keep each matrix's singular values in ``table.spectra``.
        workers: local processes sharing the matrices (files stream in each worker).
        threads: small matrices (≤ 1024 rows on the smaller side, or so) analyzed at a
            time in this process, one intra-op thread each; larger ones run one at a
            time first, with every thread. The results are the same for any ``threads`` and
            ``workers`` (each matrix's thread count depends on its size only).
            ``None``: one per torch intra-op thread (up to 4) for a model or
            state dict in CPU memory, where small matrices leave cores idle otherwise; 1
            for files (they stream one tensor at a time) and accelerators.
        distributed: split the matrices over the ranks of an initialized
            ``torch.distributed`` group (e.g. under ``torchrun``); every rank gets the
            whole table back. ``None``: on when such a group with > 1 rank exists.
        cache: a :class:`~spectrakit.SpectrumCache` or its folder: each matrix's singular values
            (the reshaped-matrix spectrum; not the conv operator or slice spectra, nor the FARMS
            windows) are read from it when this matrix, dtype, ``method`` and ``dtype`` were
            analyzed before, and written to it otherwise; the table is the same either way.

    Returns:
        A :class:`SpectrumTable`: one row per matrix with ``sigma_max``,
        ``frobenius_norm``, ``stable_rank``, ``effective_rank``, ``spectral_entropy``,
        ``sigma_min``, ``condition_number`` (σ_min refined in float64 where the spectrum
        cannot resolve it; ``None`` with ``sigma_min_method="unresolved"`` and an upper bound
        ``sigma_min_bound`` below float64's resolution; see :mod:`.conditioning`), the ESD
        metrics and ``farms_alpha``. Bad tensors (NaN/Inf, all-zero, integer, meta,
        ``1×n``) keep a row with ``status="skipped"`` and the ``reason``.

    >>> import torch, spectrakit as sk
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> table = sk.analyze(model, progress=False)
    >>> [row["shape"] for row in table]
    ['32x16', '4x32']
    """
    from .parallel import run_records

    if method not in linalg.METHODS:
        raise SpectrakitError(f"method={method!r} is not one of {', '.join(linalg.METHODS)}")
    if workers < 1:
        raise SpectrakitError(f"workers={workers} must be ≥ 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SpectrakitError(f"threads={threads!r} must be an integer ≥ 1 (or None)")
    mp_fit_function(mp_fit)  # an unknown name fails here, before any matrix is read
    if conv not in CONV_TREATMENTS:
        raise SpectrakitError(f"conv={conv!r} is not one of {', '.join(CONV_TREATMENTS)}")
    if conv == "slices" and conv_input_shape is not None:
        raise SpectrakitError("conv='slices' and conv_input_shape are two different conv spectra; pass one")
    options = AnalyzeOptions(method=method, dtype=dtype, esd=esd, xmin=xmin, farms=farms,
                             farms_xmin=farms_xmin, mp_fit=mp_fit,
                             conv_input_shape=None if conv_input_shape is None else tuple(conv_input_shape),
                             conv=conv, conv2d_norm=bool(conv2d_norm), cache=as_cache(cache),
                             keep_spectra=bool(keep_spectra))
    records = list(iter_matrices(source, include=include, exclude=exclude))
    check_selection(source, records, include, exclude)
    check_conv_input(records, options.conv_input_shape)
    results = run_records(source, records, options, include=include, exclude=exclude, workers=workers,
                          threads=threads, distributed=distributed, progress=progress)
    rows, spectra, farms_spectra = [], {}, {}
    for record in records:
        result = results[record.name]
        row = base_row(record)
        if record.kind in _CONV_KINDS:
            row["conv"] = options.conv_treatment(record.kind)
        row.update(result.metrics)
        rows.append(row)
        if keep_spectra and result.spectrum is not None:
            spectra[record.name] = result.spectrum
        if keep_spectra and result.farms_spectrum is not None:
            farms_spectra[record.name] = result.farms_spectrum
    if esd:
        warn_xmin_outside(rows, xmin)
    return SpectrumTable(rows=rows, source=_label(source), spectra=spectra, farms_spectra=farms_spectra)
