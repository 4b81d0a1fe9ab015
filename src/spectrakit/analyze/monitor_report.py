"""The monitored metrics over training steps: a section of the analyze HTML report, or a page.

One chart per metric (``sigma_max``, ``alpha``, ``intruders``, ``loss/sharpness`` …), one
line per matrix, drawn as inline SVG: it needs no script and opens offline. Steps where a
metric was not measured (NaN, e.g. curvature between its ``curvature_every``) are left
out of its line. :func:`monitor_section` is the
:class:`~spectrakit.analyze.report.ReportSection` that ``table.to_html(path,
sections=[…])`` places in the analyze report; :func:`monitor_html` is the same charts
alone on a page.

>>> history = [{"step": 0, "fc/alpha": 3.0, "loss/sharpness": 1.0}, {"step": 10, "fc/alpha": 2.5,
...            "loss/sharpness": float("nan")}]
>>> page = monitor_html(history)
>>> page.count("<svg"), "alpha" in page
(2, True)
>>> monitor_section(history).anchor
'training'
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write
from ..errors import SpectrakitError
from .report import ReportSection

_WIDTH, _HEIGHT, _PAD = 560, 220, 44
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _series(history: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metric → line name → [(step, value)], finite values only."""
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in history:
        step = float(row["step"])
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            owner, metric = key.rsplit("/", 1) if "/" in key else ("", key)
            metric = "loss/" + metric if owner == "loss" else metric
            charts.setdefault(metric, {}).setdefault(owner, []).append((step, float(value)))
    return charts


def _chart(metric: str, lines: dict[str, list[tuple[float, float]]]) -> str:
    points = [p for line in lines.values() for p in line]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-12)

    def xy(step: float, value: float) -> str:
        x = _PAD + (step - x0) / (x1 - x0) * (_WIDTH - 2 * _PAD)
        y = _HEIGHT - _PAD + (y0 - value) / (y1 - y0) * (_HEIGHT - 2 * _PAD)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{_WIDTH}" height="{_HEIGHT}" role="img" aria-label="{html.escape(metric)}">',
             f'<text x="{_PAD}" y="16" font-weight="bold">{html.escape(metric)}</text>',
             f'<text x="{_PAD}" y="{_HEIGHT - 8}" font-size="11">step {x0:g} … {x1:g}</text>',
             f'<text x="2" y="{_PAD}" font-size="11">{y1:.4g}</text>',
             f'<text x="2" y="{_HEIGHT - _PAD}" font-size="11">{y0:.4g}</text>',
             f'<rect x="{_PAD}" y="{_PAD}" width="{_WIDTH - 2 * _PAD}" height="{_HEIGHT - 2 * _PAD}" '
             'fill="none" stroke="#ccc"/>']
    for i, (name, line) in enumerate(sorted(lines.items())):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(xy(s, v) for s, v in line)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}">'
                     f'<title>{html.escape(name or metric)}</title></polyline>')
        for s, v in line[-1:]:
            parts.append(f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="2.5" '
                         f'fill="{color}"><title>{html.escape(name)} {v:.4g}</title></circle>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{_COLORS[i % len(_COLORS)]}">■ {html.escape(name or metric)}</span>'
                      for i, name in enumerate(sorted(lines)))
    return f'<figure>{"".join(parts)}<figcaption>{legend}</figcaption></figure>'


def _charts(history: Sequence[dict[str, Any]]) -> str:
    if not history:
        raise SpectrakitError("the monitor has no measurement yet: nothing to plot")
    charts = "\n".join(_chart(metric, lines) for metric, lines in _series(history).items())
    return (f'<p class="note">{len(history)} measurements, steps {history[0]["step"]}–{history[-1]["step"]}; '
            f"one chart per metric, one line per matrix (hover a line for its name).</p>\n"
            f'<div class="monitor-charts">{charts}</div>')


def monitor_section(history: Sequence[dict[str, Any]], *, heading: str = "Training: metrics over steps",
                    anchor: str = "training") -> ReportSection:
    """The charts of ``history`` as a section of the analyze HTML report.

    Args:
        history: rows ``{"step": t, "<matrix>/<metric>": value, …}`` (:attr:`SpectralMonitor.history`).
        heading: the section's title.
        anchor: its ``id``.
    """
    return ReportSection(anchor=anchor, heading=heading, body=_charts(history))


def monitor_html(history: Sequence[dict[str, Any]], *, title: str | None = None) -> str:
    """The page's HTML for ``history`` (rows of :attr:`SpectralMonitor.history`).

    Args:
        history: rows ``{"step": t, "<matrix>/<metric>": value, …}``.
        title: the page's title.
    """
    title = title or "spectrakit: monitored metrics"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0 1em 1em 0}"
            "figcaption{font-size:12px;max-width:560px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{_charts(history)}\n</body></html>\n")


def write_monitor_html(history: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                       title: str | None = None) -> Path:
    """Write :func:`monitor_html` to ``path`` atomically; returns the path.

    Args:
        history: the monitor's rows.
        path: the ``.html`` file.
        title: the page's title.
    """
    page = monitor_html(history, title=title)
    with atomic_write(path) as handle:
        handle.write(page)
    return Path(path)
