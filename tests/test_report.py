"""The HTML report: self-contained, every section present, warnings, bad rows, atomic write,
and a real headless Chromium that runs its script without errors."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

import spectrakit as sk
from spectrakit.analyze import report
from spectrakit.analyze.powerlaw import fit_power_law
from spectrakit.analyze.report import esd_histogram, find_issues, write_html_report
from spectrakit.analyze.table import SpectrumTable

SECTIONS = ("summary", "warnings", "depth", "layers", "skipped", "table")
NASTY = 'x.</script><script>alert("pwned")</script>.weight'


def _pareto_singular_values(n: int, alpha: float, seed: int) -> torch.Tensor:
    """Singular values whose squares are a Pareto sample with density ∝ λ^(−alpha)."""
    g = torch.Generator().manual_seed(seed)
    evals = (1 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))
    return evals.sqrt().sort(descending=True).values


def _row(name: str, spectrum: torch.Tensor, rows: int, cols: int, **extra) -> dict:
    evals = spectrum.square()
    fit = fit_power_law(evals)
    entropy_p = spectrum / spectrum.sum()
    row = {"name": name, "kind": "linear", "shape": f"{rows}x{cols}", "rows": rows, "cols": cols,
           "params": rows * cols, "status": "ok", "reason": "", "sigma_max": float(spectrum[0]),
           "frobenius_norm": float(evals.sum().sqrt()), "stable_rank": float(evals.sum() / evals[0]),
           "effective_rank": math.exp(float(-(entropy_p * entropy_p.log()).sum())),
           "condition_number": float(spectrum[0] / spectrum[-1]), "alpha": fit.alpha, "xmin": fit.xmin,
           "xmax": fit.xmax, "ks_distance": fit.ks_distance, "num_spikes": 3, "mp_bulk_max": float(evals.median())}
    row.update(extra)
    return row


@pytest.fixture(scope="module")
def table() -> SpectrumTable:
    heavy = _pareto_singular_values(400, alpha=1.6, seed=0)                      # alpha < 2
    g = torch.Generator().manual_seed(1)
    noise = torch.linalg.svdvals(torch.randn(200, 400, generator=g, dtype=torch.float64))
    collapsed = torch.cat([torch.tensor([50.0, 40.0, 30.0], dtype=torch.float64), torch.full((61,), 1e-5)])
    healthy = _pareto_singular_values(300, alpha=3.5, seed=2)
    rows = [
        _row("layers.0.attn.weight", heavy, 400, 400),
        _row("layers.0.mlp.weight", noise, 200, 400, alpha=7.5),                 # set by hand: > 6
        _row("layers.1.attn.weight", collapsed, 64, 64),
        _row("layers.1.mlp.weight", healthy, 300, 300, alpha=3.5, farms_alpha=3.4, farms_xmin=1.5),
        {"name": "layers.2.attn.weight", "kind": "linear", "shape": "64x64", "rows": 64, "cols": 64,
         "params": 4096, "status": "skipped", "reason": "contains NaN or Inf values"},
        _row(NASTY, healthy, 300, 300, alpha=3.5),
    ]
    spectra = {"layers.0.attn.weight": heavy, "layers.0.mlp.weight": noise, "layers.1.attn.weight": collapsed,
               "layers.1.mlp.weight": healthy, NASTY: healthy}
    farms = {"layers.1.mlp.weight": healthy.square().flip(0)}
    return SpectrumTable(rows=rows, source="synthetic", spectra=spectra, farms_spectra=farms)


def _data(text: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


# ------------------------------------------------------------------ the file

def test_single_self_contained_file(table, tmp_path):
    path = write_html_report(table, tmp_path / "out" / "report.html", title="t")
    assert path == tmp_path / "out" / "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]          # no assets, no temp file
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for attribute in re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', text, re.I):
        assert attribute.startswith("#"), attribute                           # in-page links only
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:)?//", text, re.I)
    assert "<style>" in text and "<script>" in text
    for section in SECTIONS:
        assert f'id="{section}"' in text


def test_escapes_names(table, tmp_path):
    text = write_html_report(table, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'alert("pwned")' not in text and "<script>alert" not in text
    assert NASTY in _data(text)["names"]                                       # the JSON keeps it intact
    assert "&lt;/script&gt;&lt;script&gt;alert(&quot;pwned&quot;)" in text      # the tables show it escaped


def test_summary_and_table(table, tmp_path):
    text = write_html_report(table, tmp_path / "r.html").read_text(encoding="utf-8")
    summary = text[text.index('id="summary"'):text.index('id="warnings"')]
    assert "matrices</span><b>6</b>" in summary and "skipped</span><b>1</b>" in summary
    assert f"{table.summary()['median_alpha']:.4g}" in summary
    body = text[text.index('id="table"'):]
    assert body.count("<tr class=") == len(table.rows)
    assert body.count('<tr class="skip">') == 1


def test_layer_and_depth_data(table, tmp_path):
    data = _data(write_html_report(table, tmp_path / "r.html").read_text(encoding="utf-8"))
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert set(layers) == set(table.spectra)                                   # the skipped row has none
    heavy = layers["layers.0.attn.weight"]["esd"]["fit"]
    assert heavy["alpha"] == pytest.approx(table["layers.0.attn.weight"]["alpha"], rel=1e-3)
    assert "farms" in layers["layers.1.mlp.weight"] and "fit" in layers["layers.1.mlp.weight"]["farms"]
    assert "farms" not in layers["layers.0.attn.weight"]
    depth = {series["column"]: series for series in data["depth"]}
    assert {"alpha", "farms_alpha", "stable_rank", "effective_rank", "num_spikes", "condition_number"} <= set(depth)
    assert depth["alpha"]["values"][1] == 7.5 and depth["alpha"]["values"][4] is None   # skipped: no point
    assert depth["alpha"]["bands"][0][1] == 2.0 and depth["alpha"]["bands"][1][0] == 6.0
    assert not {"name", "shape", "status", "reason", "rows", "params", "xmin"} & set(depth)


# ------------------------------------------------------------------ the ESD plot

def test_histogram_is_a_density_and_the_fit_sits_on_it():
    alpha = 2.5
    g = torch.Generator().manual_seed(3)
    evals = (1 - torch.rand(20000, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))
    evals = torch.cat([evals, torch.zeros(5, dtype=torch.float64)])            # zeros are dropped, not binned
    fit = fit_power_law(evals, xmin="median")
    plot = esd_histogram(evals, alpha=fit.alpha, xmin=fit.xmin, xmax=fit.xmax)
    assert plot["n"] == 20000 and plot["zeros"] == 5
    width = (plot["hi"] - plot["lo"]) / len(plot["y"])
    edges = [10 ** (plot["lo"] + i * width) for i in range(len(plot["y"]) + 1)]
    mass = sum(10 ** y * (edges[i + 1] - edges[i]) for i, y in enumerate(plot["y"]) if y is not None)
    assert mass == pytest.approx(1.0, rel=0.01)                                # density of all λ > 0
    line = plot["fit"]
    share = int((evals >= fit.xmin).sum()) / 20000
    assert line["share"] == pytest.approx(share, rel=1e-3) and line["tail"] == fit.tail_size
    (x0, y0), (x1, y1) = line["line"]
    assert x0 == pytest.approx(math.log10(fit.xmin))
    assert y0 == pytest.approx(math.log10(share * (fit.alpha - 1) / fit.xmin))
    assert (y1 - y0) / (x1 - x0) == pytest.approx(-fit.alpha)                 # slope −α on log-log axes
    # The line goes through the histogram where the tail has data (well-populated bins).
    for i, y in enumerate(plot["y"]):
        centre = plot["lo"] + (i + 0.5) * width
        if y is not None and x0 + 0.2 < centre < x0 + 1.5:
            assert abs(y - (y0 - fit.alpha * (centre - x0))) < 0.15


def test_histogram_edge_cases():
    assert esd_histogram(torch.zeros(4, dtype=torch.float64)) is None
    flat = esd_histogram(torch.ones(10, dtype=torch.float64), alpha=float("nan"), xmin=1.0)
    assert flat["n"] == 10 and "fit" not in flat and sum(y is not None for y in flat["y"]) == 1
    assert "fit" not in esd_histogram(torch.rand(50, dtype=torch.float64) + 0.1, alpha=0.8, xmin=0.5)  # α ≤ 1


# ------------------------------------------------------------------ warnings

def test_warnings(table, tmp_path):
    issues = {issue["id"]: [name for name, _ in issue["layers"]] for issue in find_issues(table.rows)}
    assert issues["alpha_low"] == ["layers.0.attn.weight"]
    assert issues["alpha_high"] == ["layers.0.mlp.weight"]
    assert issues["rank_collapse"] == ["layers.1.attn.weight"]
    assert issues["skipped"] == ["layers.2.attn.weight"]
    assert issues["condition"] == ["layers.1.attn.weight"]                     # 50 / 1e-5 > 1e6
    assert "layers.1.mlp.weight" not in sum(issues.values(), [])                # healthy: no warning
    text = write_html_report(table, tmp_path / "r.html").read_text(encoding="utf-8")
    warnings = text[text.index('id="warnings"'):text.index('id="depth"')]
    for key in ("alpha_low", "alpha_high", "rank_collapse", "skipped"):
        assert f'data-issue="{key}"' in warnings
    assert "over-trained" in warnings and "close to random" in warnings
    assert "<code>layers.0.mlp.weight</code> — alpha = 7.50" in warnings


def test_more_warnings():
    base = {"status": "ok", "rows": 100, "cols": 200}
    rows = [dict(base, name="spiky", num_spikes=60), dict(base, name="one-direction", stable_rank=1.1),
            dict(base, name="singular", condition_number=math.inf), dict(base, name="nan-fit", alpha=math.nan),
            dict(base, name="farms", farms_alpha=8.0), dict(base, name="fine", num_spikes=5, stable_rank=20.0,
                                                            effective_rank=80.0, condition_number=30.0, alpha=3.0)]
    issues = {issue["id"]: dict(issue["layers"]) for issue in find_issues(rows)}
    assert set(issues) == {"spikes", "rank_collapse", "condition", "fit_failed", "farms_high"}
    assert issues["spikes"] == {"spiky": "60 spikes of 100 eigenvalues"}
    assert issues["condition"] == {"singular": "σ_min unresolved, below float64 precision: numerically rank-deficient"}
    unresolved = dict(base, name="u", sigma_min=None, condition_number=None, sigma_min_method="unresolved",
                      sigma_min_bound=3e-9)
    assert dict(find_issues([unresolved])[0]["layers"])["u"] == (
        "σ_min unresolved, below float64 precision (< 3e-09): numerically rank-deficient")
    assert find_issues([dict(base, name="fine", alpha=3.0)]) == []


# ------------------------------------------------------------------ any table renders

@pytest.mark.parametrize("rows", [
    [],
    [{"name": "w"}],                                                          # no status, no metrics
    [{"name": "a", "status": "skipped", "reason": "all-zero matrix"}],
    [{"name": "b", "status": "ok", "shape": "3x4", "alpha": None, "stable_rank": "n/a"}],
])
def test_degrades_gracefully(rows, tmp_path):
    text = write_html_report(SpectrumTable(rows=rows), tmp_path / "r.html").read_text(encoding="utf-8")
    data = _data(text)
    assert data["layers"] == [] and data["depth"] == []
    for section in SECTIONS:
        assert f'id="{section}"' in text


def test_linear_module(tmp_path):
    table = sk.analyze(torch.nn.Linear(64, 32), progress=False)
    text = write_html_report(table, tmp_path / "r.html").read_text(encoding="utf-8")
    data = _data(text)
    assert [layer["name"] for layer in data["layers"]] == ["weight"]
    assert data["layers"][0]["esd"]["n"] == 32
    assert {"sigma_max", "stable_rank"} <= {series["column"] for series in data["depth"]}


def test_written_atomically(table, tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")
    real = report.atomic_write
    calls = []

    @contextlib.contextmanager
    def interrupted(target, *args, **kwargs):
        calls.append(target)
        with real(target, *args, **kwargs) as handle:
            class Half:
                def write(self, text):
                    handle.write(text[: len(text) // 2])
                    raise KeyboardInterrupt
            yield Half()

    monkeypatch.setattr(report, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_html_report(table, path)
    assert calls == [path]
    assert path.read_text() == "old report"                                    # never half-written
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]             # no temp file left


# ------------------------------------------------------------------ a real browser

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.mark.parametrize("kind", ["synthetic", "minimal"])
def test_renders_in_headless_chromium(kind, table, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium) to render the report in")
    source = table if kind == "synthetic" else SpectrumTable(rows=[{"name": "w", "status": "ok"}])
    path = write_html_report(source, tmp_path / "report.html")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=90)
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body, result.stderr[-2000:]
    assert "data-errors" not in body, body
    assert "Uncaught" not in result.stderr, result.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    if kind == "synthetic":
        data = _data(path.read_text(encoding="utf-8"))
        cards = re.findall(r'<div class="card" data-name="([^"]*)"', dom)
        assert len(cards) == len(data["layers"]) == 5
        charts = dom.count('class="chart"')
        esd_charts = sum(("esd" in layer) + ("farms" in layer) for layer in data["layers"])
        assert charts == len(data["depth"]) + esd_charts
        assert dom.count('class="fit"') >= 4                                    # fitted lines drawn
        assert 'data-flagged="1"' in dom
    else:
        assert "No numeric metric columns" in dom and "No spectra kept" in dom
