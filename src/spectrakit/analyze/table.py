"""The result of an analysis: one row per matrix, with exports and a summary."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_save_path, atomic_write
from ..errors import SpectrakitError

# Columns shown in the terminal, in order, with their headers.
ANALYZE_DISPLAY = (
    ("name", "name"), ("shape", "shape"), ("conv", "conv"), ("sigma_max", "σ₁"), ("frobenius_norm", "‖W‖_F"),
    ("stable_rank", "stable rank"), ("effective_rank", "eff. rank"),
    ("condition_number", "cond"), ("alpha", "alpha"), ("farms_alpha", "FARMS α"),
    ("num_spikes", "spikes"), ("status", "status"),
)
_OPTIONAL_DISPLAY = ("conv",)
# Model-level averages, as weightwatcher's get_summary() reports them (means), plus medians.
MEAN_COLUMNS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm",
                "stable_rank", "mp_softrank", "farms_alpha")
MEDIAN_COLUMNS = ("sigma_max", "stable_rank", "effective_rank", "condition_number", "alpha", "farms_alpha",
                  "num_spikes")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclass
class SpectrumTable:
    """Rows of per-matrix metrics; skipped matrices keep a row with their reason.

    Args:
        rows: one dict per matrix: its name, shape, metrics and ``status`` (``ok`` or the skip reason).
        source: what was analyzed (a path or a model's class name), for the report's title.
        spectra: each analyzed matrix's eigenvalues λ = σ², by name, for the report's plots.
        farms_spectra: the FARMS-averaged ESD of each matrix, by name.
        display: ``(column, header)`` pairs that :meth:`format` prints.
        extra_summary: figures merged into :meth:`summary` (e.g. the Lipschitz products).

    >>> import spectrakit as sk, torch
    >>> table = sk.analyze(torch.nn.Linear(64, 32), progress=False)
    >>> table.rows[0]["shape"]
    '32x64'
    """

    rows: list[dict[str, Any]]
    source: str = ""
    spectra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # pooled eigenvalues of each matrix's FARMS submatrices, when FARMS was computed
    farms_spectra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    display: tuple[tuple[str, str], ...] = field(default=ANALYZE_DISPLAY, repr=False)
    # model-level figures computed by the producer of the table, merged into summary()
    extra_summary: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)

    @property
    def columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names.extend(key for key in row if key not in names)
        return names

    @property
    def analyzed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ok"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    def summary(self) -> dict[str, Any]:
        """Model-level figures: counts, parameters, and medians/extremes of the metrics."""
        ok = self.analyzed
        summary: dict[str, Any] = {
            "source": self.source,
            "matrices": len(self.rows),
            "analyzed": len(ok),
            "skipped": len(self.rows) - len(ok),
            "parameters": sum(int(row.get("params") or 0) for row in ok),
        }
        for column in dict.fromkeys(MEAN_COLUMNS + MEDIAN_COLUMNS):
            values = [float(row[column]) for row in ok if isinstance(row.get(column), (int, float))
                      and math.isfinite(row[column])]
            if not values:
                continue
            values_t = torch.tensor(values, dtype=torch.float64)
            if column in MEAN_COLUMNS:
                summary[f"mean_{column}"] = float(values_t.mean())
            if column in MEDIAN_COLUMNS:
                summary[f"median_{column}"] = float(values_t.median())
        if any("intruders" in row for row in ok):
            summary["total_intruders"] = sum(int(row["intruders"]) for row in ok)
            summary["layers_with_intruders"] = sum(1 for row in ok if row["intruders"] > 0)
        sigma = [row["sigma_max"] for row in ok if "sigma_max" in row]
        if sigma:
            summary["max_sigma_max"] = max(sigma)
        summary.update(self.extra_summary)
        return summary

    def to_pandas(self) -> Any:  # a pandas.DataFrame (pandas is optional and untyped)
        """A ``pandas.DataFrame`` (needs the ``report`` extra)."""
        try:
            import pandas as pd
        except ImportError as error:
            raise SpectrakitError("to_pandas() needs pandas: pip install 'spectrakit[report]'") from error
        return pd.DataFrame(self.rows, columns=self.columns)

    def to_parquet(self, path: str | os.PathLike) -> None:
        """Write every row to ``path`` as Parquet, atomically (needs pandas and pyarrow)."""
        try:
            import pyarrow  # noqa: F401
        except ImportError as error:
            raise SpectrakitError("to_parquet() needs pyarrow: pip install pyarrow") from error
        frame = self.to_pandas()
        with atomic_save_path(path) as tmp:
            frame.to_parquet(tmp, index=False)

    def to_html(self, path: str | os.PathLike, *, title: str | None = None, sections: Sequence[Any] = ()) -> Path:
        """Write the self-contained HTML report (see :mod:`spectrakit.analyze.report`).

        Args:
            path: the ``.html`` file.
            title: the page's title.
            sections: extra :class:`~spectrakit.analyze.report.ReportSection` s, e.g. a
                monitor's ``report_section()``.
        """
        from .report import write_html_report

        return write_html_report(self, path, title=title, sections=sections)

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write every row to ``path`` as CSV, atomically."""
        with atomic_write(path) as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, lineterminator="\n")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({key: _format_csv(value) for key, value in row.items()})

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``{"summary": ..., "rows": [...]}`` to ``path``, atomically."""
        document = {
            "summary": {k: _json_safe(v) for k, v in self.summary().items()},
            "rows": [{k: _json_safe(v) for k, v in row.items()} for row in self.rows],
        }
        with atomic_write(path) as handle:
            json.dump(document, handle, indent=1)
            handle.write("\n")

    def format(self, max_name: int = 48) -> str:
        """The table as aligned text, with skip reasons listed underneath."""
        # columns only some sources have (conv treatment) are shown where a row has them
        display = [(key, title) for key, title in self.display
                   if key not in _OPTIONAL_DISPLAY or any(row.get(key) for row in self.rows)]
        header = [title for _, title in display]
        body = []
        for row in self.rows:
            cells = [_format(row.get(key)) for key, _ in display]
            if len(cells[0]) > max_name:
                cells[0] = "…" + cells[0][-(max_name - 1):]
            body.append(cells)
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        numeric = {i for i, (key, _) in enumerate(display) if key not in ("name", "shape", "conv", "status")}
        lines = []
        for cells in [header, *body]:
            lines.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths))
        for row in self.skipped:
            lines.append(f"skipped {row['name']}: {row['reason']}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _format_csv(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return value
