"""The HTML report of an analysis: one self-contained file that works offline.

For each analyzed matrix the report draws its empirical spectral density (ESD) — the
eigenvalues ``λᵢ = σᵢ²`` binned on log-spaced bins, as a density ``p(λ)`` on log-log
axes — with the fitted power law over the tail,

    p(λ) = s · (α − 1)/x_min · (λ / x_min)^(−α),   x_min ≤ λ ≤ x_max,

where ``s = #{λ ≥ x_min} / #{λ > 0}`` is the tail's share of the ESD, so the line sits on
the histogram (both integrate to the share of eigenvalues they describe). The pooled FARMS
eigenvalues get the same plot with ``farms_alpha``/``farms_xmin``. Below come metric charts
across depth (one per numeric column present), a summary, plain-language warnings (see
:data:`THRESHOLDS`), every skipped matrix with its reason, and the full table.

Everything numeric is computed here; the inline script only draws it. Data travel as JSON
inside the page; CSS, script and SVG are inline, so the file opens anywhere, offline.
Missing columns or spectra only remove the parts that need them: any
:class:`~spectrakit.analyze.table.SpectrumTable` renders. Callers may add sections of their
own (:class:`ReportSection`, e.g. :meth:`SpectralMonitor.report_section
<spectrakit.analyze.monitor.SpectralMonitor.report_section>`'s metrics over training steps);
they come after the spectra, with a link in the header.

>>> import torch, spectrakit as sk
>>> table = sk.analyze(torch.nn.Linear(64, 32), progress=False)
>>> write_html_report(table, "report.html", title="a Linear")   # doctest: +SKIP
PosixPath('report.html')
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._atomic import atomic_write
from ..errors import SpectrakitError
from .powerlaw import EVALS_THRESH

if TYPE_CHECKING:  # table.py imports this module
    from .table import SpectrumTable

#: where a layer earns a warning (the usual weightwatcher reading of alpha: 2–6 is healthy)
THRESHOLDS = {
    "alpha_low": 2.0,             # alpha below: very heavy-tailed, possibly over-trained
    "alpha_high": 6.0,            # alpha above: close to a random matrix, under-trained
    "spike_share": 0.25,          # spikes above this share of min(N, M)
    "effective_rank_share": 0.1,  # effective rank below this share of min(N, M)
    "stable_rank_min": 1.5,       # stable rank below: one direction carries the matrix
    "condition_max": 1e6,         # condition number above: numerically near-singular
}
_MIN_BINS, _MAX_BINS = 12, 60
_MIN_DIM_FOR_RANK = 8  # rank warnings mean little on tiny matrices

# Depth charts, in this order when present: column, label, bands (y0, y1, css class).
_ALPHA_BANDS = [[None, THRESHOLDS["alpha_low"], "band-low"], [THRESHOLDS["alpha_high"], None, "band-high"]]
_DEPTH = (
    ("alpha", "alpha (ESD tail exponent)", _ALPHA_BANDS),
    ("farms_alpha", "FARMS alpha", _ALPHA_BANDS),
    ("alpha_weighted", "alpha weighted (α · log₁₀ λ_max)", None),
    ("log_spectral_norm", "log₁₀ spectral norm (log₁₀ λ_max)", None),
    ("log_norm", "log₁₀ Frobenius norm² (log₁₀ Σλ)", None),
    ("sigma_max", "σ₁ (largest singular value)", None),
    ("stable_rank", "stable rank (‖W‖_F² / σ₁²)", None),
    ("effective_rank", "effective rank (exp entropy)", None),
    ("num_spikes", "spikes above the Marchenko–Pastur bulk", None),
    ("mp_softrank", "MP soft rank (λ₊ / λ_max)", None),
    ("condition_number", "condition number (σ₁ / σ_min)", None),
    ("spectral_entropy", "spectral entropy (nats)", None),
    ("ks_distance", "KS distance of the power-law fit", None),
)
# Columns that identify a matrix or locate a fit rather than describe the layer.
_NOT_CHARTED = {"rows", "cols", "params", "xmin", "xmax", "farms_xmin", "farms_xmax", "mp_bulk_max",
                "sigma_mp", "num_pl_spikes", "farms_num_pl_spikes", "frobenius_norm", "spectral_norm",
                "log_alpha_norm", "farms_ks_distance"}


@dataclass(frozen=True)
class ReportSection:
    """An extra section of the report: a heading over a self-contained HTML fragment.

    Args:
        anchor: the section's ``id`` (letters, digits, ``-`` and ``_``), linked from the header.
        heading: its title (plain text; escaped here).
        body: its HTML, inserted as it is: the producer escapes whatever text it embeds,
            and the fragment must work offline (inline SVG, no external resources).
    """

    anchor: str
    heading: str
    body: str


def _extra_sections(sections: Sequence[ReportSection]) -> tuple[str, str]:
    """The header links and the ``<section>`` elements of the extra sections."""
    taken = {"summary", "warnings", "depth", "layers", "skipped", "table"}
    links, blocks = [], []
    for section in sections:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", section.anchor) or section.anchor in taken:
            raise SpectrakitError(f"report section anchor {section.anchor!r} must be a new id of letters, digits, "
                                  "'-' or '_'")
        taken.add(section.anchor)
        heading = html.escape(section.heading)
        links.append(f'<a href="#{section.anchor}">{heading}</a>')
        blocks.append(f'<section id="{section.anchor}" class="extra"><h2>{heading}</h2>{section.body}</section>')
    return "".join(links), "\n".join(blocks)


def write_html_report(table: SpectrumTable, path: str | os.PathLike, *, title: str | None = None,
                      sections: Sequence[ReportSection] = ()) -> Path:
    """Write the HTML report of ``table`` to ``path`` atomically; return the path.

    Args:
        table: the analysis.
        path: the ``.html`` file.
        title: the page's title (default from the table's source).
        sections: extra :class:`ReportSection` s, shown after the spectra in this order.

    >>> import spectrakit as sk
    >>> from spectrakit.analyze.report import write_html_report
    >>> table = sk.analyze(sk.reference.reference_weights_path(), progress=False)  # doctest: +SKIP
    >>> write_html_report(table, "out/report.html", title="reference model")       # doctest: +SKIP
    PosixPath('out/report.html')
    """
    path = Path(path)
    title = title or f"spectrakit report — {table.source or 'model'}"
    rows = list(table.rows)
    columns = _columns(rows)
    issues = find_issues(rows)
    extra_links, extra_sections = _extra_sections(sections)
    data = {
        "names": [str(row.get("name", "")) for row in rows],
        "depth": _depth_series(rows, columns),
        "layers": _layer_plots(table, rows),
        "flags": _flags(issues),
    }
    parts = {
        "TITLE": html.escape(title),
        "SUMMARY": _summary_html(table),
        "WARNINGS": _issues_html(issues),
        "SKIPPED": _skipped_html(rows),
        "TABLE": _table_html(table, rows, columns, issues),
        "DATA": _script_json(data),
        "EXTRANAV": extra_links,
        "EXTRA": extra_sections,
    }
    text = re.sub(r"\{\{([A-Z]+)\}\}", lambda match: parts[match.group(1)], _template())
    with atomic_write(path) as handle:
        handle.write(text)
    return path


def _template() -> str:
    return resources.files(__package__).joinpath("report_template.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- numbers

def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bools, strings, None are not)."""
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several elements
        return None


def _finite(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _fmt(value: Any) -> str:
    """A cell's text: integers as they are, floats to 4 significant digits, the rest as ``str``."""
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "−inf"
    if not isinstance(value, float) and number.is_integer():
        return str(int(number))
    return f"{number:.4g}" if number == 0 or 1e-3 <= abs(number) < 1e5 else f"{number:.3e}"


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _min_dim(row: dict[str, Any]) -> int | None:
    rows, cols = _finite(row.get("rows")), _finite(row.get("cols"))
    return int(min(rows, cols)) if rows and cols else None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names.extend(key for key in row if key not in names)
    return names


# ---------------------------------------------------------------- spectra

def esd_histogram(eigenvalues: torch.Tensor, *, alpha: Any = None, xmin: Any = None,
                  xmax: Any = None) -> dict[str, Any] | None:
    """Log-binned density of the positive ``eigenvalues`` and the power-law line over its tail.

    Returns ``lo``/``hi`` (log₁₀ of the outer bin edges, equal-width bins in log space),
    ``y`` (log₁₀ density per bin; ``None`` for an empty bin), ``n`` (eigenvalues > 0
    counted), ``zeros`` (those dropped) and, when ``alpha > 1`` and ``xmin > 0``, ``fit``:
    the line's end points ``[[log₁₀ λ, log₁₀ p], …]`` with ``alpha``, ``xmin`` and the tail
    ``share``. ``None`` when no eigenvalue is positive.
    """
    evals = eigenvalues.detach().to(torch.float64).flatten()
    evals = evals[torch.isfinite(evals)]
    positive = evals[evals > EVALS_THRESH]
    count = positive.numel()
    if count == 0:
        return None
    logs = positive.log10()
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-3:  # a flat spectrum: one narrow bin around it
        lo, hi = lo - 0.05, hi + 0.05
    bins = max(_MIN_BINS, min(_MAX_BINS, round(3 * count ** (1 / 3))))
    # (torch.histc is ~100x slower than this on small float64 inputs)
    index = ((logs - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()
    counts = torch.bincount(index, minlength=bins).double()
    edges = 10 ** torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    density = counts / (count * (edges[1:] - edges[:-1]))
    plot: dict[str, Any] = {
        "lo": _round(lo, 6), "hi": _round(hi, 6), "n": count, "zeros": int(evals.numel() - count),
        "y": [round(math.log10(d), 3) if d > 0 else None for d in density.tolist()],
    }
    alpha, xmin, xmax = _finite(alpha), _finite(xmin), _finite(xmax)
    if alpha is not None and alpha > 1 and xmin is not None and xmin > 0:
        tail = int((positive >= xmin * (1 - 1e-9)).sum())
        top = max(xmax if xmax is not None and xmax > xmin else 10 ** hi, xmin * 1.0001)
        share = tail / count
        if tail > 0:
            at = lambda lam: math.log10(share * (alpha - 1) / xmin) - alpha * math.log10(lam / xmin)  # noqa: E731
            plot["fit"] = {"alpha": _round(alpha), "xmin": _round(xmin), "tail": tail, "share": _round(share),
                           "line": [[math.log10(xmin), at(xmin)], [math.log10(top), at(top)]]}
    return plot


def _layer_plots(table: SpectrumTable, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spectra = getattr(table, "spectra", None) or {}
    farms = getattr(table, "farms_spectra", None) or {}
    layers = []
    for index, row in enumerate(rows):
        name = row.get("name")
        if row.get("status", "ok") != "ok" or (name not in spectra and name not in farms):
            continue
        layer: dict[str, Any] = {"index": index, "name": str(name), "shape": str(row.get("shape", "")),
                                 "ks": _finite(row.get("ks_distance")),
                                 "bulk": _finite(row.get("mp_bulk_max")), "spikes": _finite(row.get("num_spikes"))}
        if name in spectra:
            layer["esd"] = esd_histogram(torch.as_tensor(spectra[name]).double().square(), alpha=row.get("alpha"),
                                         xmin=row.get("xmin"), xmax=row.get("xmax"))
        if name in farms:
            layer["farms"] = esd_histogram(torch.as_tensor(farms[name]), alpha=row.get("farms_alpha"),
                                           xmin=row.get("farms_xmin"), xmax=row.get("farms_xmax"))
        layers.append(layer)
    return layers


def _depth_series(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    known = [entry for entry in _DEPTH if entry[0] in columns]
    others = [(c, c.replace("_", " "), None) for c in columns
              if c not in _NOT_CHARTED and c not in {entry[0] for entry in _DEPTH}]
    charts = []
    for column, label, bands in known + others:
        values = [_finite(row.get(column)) if row.get("status", "ok") == "ok" else None for row in rows]
        present = [v for v in values if v is not None]
        if not present or any(isinstance(row.get(column), str) for row in rows):
            continue
        log = min(present) > 0 and max(present) / min(present) > 1e3
        charts.append({"column": column, "label": label, "log": log, "bands": bands,
                       "values": [None if v is None else _round(v, 5) for v in values]})
    return charts


# ---------------------------------------------------------------- warnings

def find_issues(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The warnings of the report: ``[{"id", "title", "advice", "layers": [(name, detail)]}]``.

    Only issues that at least one row has are returned, most serious first.
    """
    t = THRESHOLDS
    found: dict[str, list[tuple[str, str]]] = {key: [] for key in _ADVICE}
    for row in rows:
        name = str(row.get("name", ""))
        if row.get("status", "ok") != "ok":
            found["skipped"].append((name, str(row.get("reason") or "no reason given")))
            continue
        alpha, farms = _finite(row.get("alpha")), _finite(row.get("farms_alpha"))
        if alpha is not None and alpha < t["alpha_low"]:
            found["alpha_low"].append((name, f"alpha = {alpha:.2f}"))
        if alpha is not None and alpha > t["alpha_high"]:
            found["alpha_high"].append((name, f"alpha = {alpha:.2f}"))
        if farms is not None and farms < t["alpha_low"]:
            found["farms_low"].append((name, f"FARMS alpha = {farms:.2f}"))
        if farms is not None and farms > t["alpha_high"]:
            found["farms_high"].append((name, f"FARMS alpha = {farms:.2f}"))
        if "alpha" in row and alpha is None and _number(row.get("alpha")) is not None:
            found["fit_failed"].append((name, "alpha is not a number"))
        dim = _min_dim(row)
        spikes, effective, stable = (_finite(row.get(k)) for k in ("num_spikes", "effective_rank", "stable_rank"))
        if dim and spikes is not None and spikes > t["spike_share"] * dim:
            found["spikes"].append((name, f"{int(spikes)} spikes of {dim} eigenvalues"))
        if dim and dim >= _MIN_DIM_FOR_RANK:
            if effective is not None and effective < t["effective_rank_share"] * dim:
                found["rank_collapse"].append((name, f"effective rank {effective:.1f} of {dim}"))
            elif stable is not None and stable < t["stable_rank_min"]:
                found["rank_collapse"].append((name, f"stable rank {stable:.2f} of {dim}"))
        condition = _number(row.get("condition_number"))
        if row.get("sigma_min_method") == "unresolved" or (condition is not None and not math.isfinite(condition)):
            bound = _finite(row.get("sigma_min_bound"))
            found["condition"].append((name, "σ_min unresolved, below float64 precision"
                                       + (f" (< {bound:.2g})" if bound is not None else "")
                                       + ": numerically rank-deficient"))
        elif condition is not None and condition > t["condition_max"]:
            found["condition"].append((name, f"condition number {condition:.3g}"))
    return [{"id": key, "title": _ADVICE[key][0], "advice": _ADVICE[key][1], "layers": layers}
            for key, layers in found.items() if layers]


_ADVICE = {
    "skipped": ("matrices were skipped",
                "They have no spectrum to analyze (NaN/Inf, all-zero, integer, meta or degenerate "
                "tensors); the reason for each is listed under Skipped matrices."),
    "alpha_low": (f"alpha < {THRESHOLDS['alpha_low']:g}: very heavy-tailed, possibly over-trained",
                  "A tail exponent below 2 means a few large eigenvalues dominate the layer. In the "
                  "heavy-tailed self-regularization reading this is over-trained or over-fit "
                  "(it also happens in small, strongly trained models). Compare with validation "
                  "loss before acting; lowering the learning rate of these layers or a spectral "
                  "penalty are the usual remedies."),
    "alpha_high": (f"alpha > {THRESHOLDS['alpha_high']:g}: close to random, under-trained",
                   "The ESD has hardly left the random-matrix (Marchenko–Pastur) shape: the layer "
                   "has learned little. Train longer, or check that it receives gradient (frozen, "
                   "dead or newly initialized layers look like this)."),
    "farms_low": (f"FARMS alpha < {THRESHOLDS['alpha_low']:g}",
                  "The same reading as alpha, from square sub-windows of the matrix, so layers of "
                  "different shapes compare fairly."),
    "farms_high": (f"FARMS alpha > {THRESHOLDS['alpha_high']:g}",
                   "The same reading as alpha > 6, from square sub-windows of the matrix."),
    "fit_failed": ("the power-law fit failed",
                   "Too few distinct non-zero eigenvalues (or a flat spectrum) for a tail fit."),
    "rank_collapse": ("rank collapse",
                      f"The effective rank is below {THRESHOLDS['effective_rank_share']:.0%} of "
                      f"min(N, M), or the stable rank is below {THRESHOLDS['stable_rank_min']:g}: "
                      "the matrix acts on a handful of directions only. Often a sign of collapsed "
                      "training or a layer dominated by one outlier direction."),
    "spikes": ("many spikes",
               f"More than {THRESHOLDS['spike_share']:.0%} of the eigenvalues lie above the "
               "Marchenko–Pastur bulk edge: the layer is far from random, and the MP bulk fit "
               "(num_spikes, mp_softrank) describes it poorly."),
    "condition": (f"huge condition number (> {THRESHOLDS['condition_max']:.0e})",
                  "The smallest singular value is (nearly) zero: the matrix is numerically "
                  "rank-deficient and inverting or whitening with it is unstable. Usually harmless "
                  "for inference. σ_min is computed in float64 where the float32 spectrum cannot "
                  "resolve it; \"unresolved\" means it lies below even float64's precision."),
}


def _flags(issues: list[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Each flagged matrix's ``[detail, issue title]`` pairs, for the badges on its ESD card."""
    flags: dict[str, list[list[str]]] = {}
    for issue in issues:
        for name, detail in issue["layers"]:
            flags.setdefault(name, []).append([detail, issue["title"]])
    return flags


# ---------------------------------------------------------------- HTML pieces

def _summary_html(table: SpectrumTable) -> str:
    try:
        summary = table.summary()
    except Exception as error:  # a report must not die on one odd figure
        return f'<p class="note">summary unavailable: {html.escape(str(error))}</p>'
    cells = "".join(f'<div><span>{html.escape(str(key).replace("_", " "))}</span>'
                    f"<b>{html.escape(_fmt(value))}</b></div>" for key, value in summary.items())
    return f'<div class="kv">{cells}</div>'


def _issues_html(issues: list[dict[str, Any]]) -> str:
    if not issues:
        return '<p class="ok">No warnings: every metric is within the usual ranges.</p>'
    blocks = []
    for issue in issues:
        layers = "".join(f"<li><code>{html.escape(name)}</code> — {html.escape(detail)}</li>"
                         for name, detail in issue["layers"])
        count = len(issue["layers"])
        blocks.append(
            f'<div class="issue issue-{issue["id"]}" data-issue="{issue["id"]}">'
            f'<h3>{count} {"matrix" if count == 1 else "matrices"}: {html.escape(issue["title"])}</h3>'
            f'<p>{html.escape(issue["advice"])}</p>'
            f'<details{" open" if count <= 5 else ""}><summary>which</summary><ul>{layers}</ul></details></div>')
    return "".join(blocks)


def _skipped_html(rows: list[dict[str, Any]]) -> str:
    skipped = [row for row in rows if row.get("status", "ok") != "ok"]
    if not skipped:
        return '<p class="ok">None: every matrix was analyzed.</p>'
    body = "".join(f"<tr><td><code>{html.escape(str(row.get('name', '')))}</code></td>"
                   f"<td>{html.escape(str(row.get('shape', '')))}</td>"
                   f"<td>{html.escape(str(row.get('reason') or 'no reason given'))}</td></tr>" for row in skipped)
    return f'<table class="grid"><tr><th>name</th><th>shape</th><th>reason</th></tr>{body}</table>'


def _table_html(table: SpectrumTable, rows: list[dict[str, Any]], columns: list[str],
                issues: list[dict[str, Any]]) -> str:
    display = [key for key, _ in getattr(table, "display", ()) if key in columns]
    headers = dict(getattr(table, "display", ()))
    shown = display or [c for c in columns if c != "reason"]
    flagged = {name for issue in issues if issue["id"] != "skipped" for name, _ in issue["layers"]}
    head = "".join(f'<th data-col="{i}">{html.escape(headers.get(key, key))}</th>' for i, key in enumerate(shown))
    body = []
    for row in rows:
        name = str(row.get("name", ""))
        cls = "skip" if row.get("status", "ok") != "ok" else ("flag" if name in flagged else "")
        cells = "".join(f'<td title="{html.escape(key)}">{html.escape(_fmt(row.get(key)))}</td>' for key in shown)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f'<table class="grid sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _script_json(data: dict[str, Any]) -> str:
    """JSON that is safe inside ``<script type="application/json">`` (no ``</script>`` breakout)."""
    text = json.dumps(_clean(data), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
