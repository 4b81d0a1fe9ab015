"""SpectralMonitor's training metrics: intruders = sk.compare vs the start, alpha = sk.analyze,
sharpness and alignment = analyze.hessian; the HTML plot."""

import math

import pytest
import torch

import spectrakit as sk
from spectrakit.errors import SpectrakitError

F = torch.nn.functional


def test_intruders_alpha_sharpness_alignment_match_their_definitions(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32)).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 64, generator=g, dtype=torch.float64), torch.randn(64, 32, generator=g, dtype=torch.float64)
    monitor = sk.SpectralMonitor(model, every=10, metrics=["intruders", "alpha", "sharpness", "alignment"],
                                 loss_fn=F.mse_loss, batches=[(x, y)], curvature_every=20, alignment_k=3,
                                 intruder_k=5, curvature_params="2.*")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(21):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        monitor.step(step)
    last = monitor.history[-1]
    table = sk.compare(start, model.state_dict(), k=5, progress=False)
    analyzed = sk.analyze(model, progress=False, farms=False)
    for name in ("0", "2"):
        assert last[f"{name}/intruders"] == table[f"{name}.weight"]["intruders"]
        assert math.isfinite(last[f"{name}/alpha"])
        assert last[f"{name}/alpha"] == pytest.approx(analyzed[f"{name}.weight"]["alpha"], rel=1e-12)
    assert math.isnan(monitor.history[1]["loss/sharpness"])  # step 10: not a curvature step
    h = sk.analyze.hessian(model, F.mse_loss, [(x, y)], params="2.*")
    top = h.top(3, tol=1e-8, vectors=True)
    assert last["loss/sharpness"] == pytest.approx(float(top.values[0]), rel=1e-3)
    expected = sk.analyze.gradient_alignment(h.gradient(), top.vectors)
    assert last["loss/alignment"] == pytest.approx(expected, rel=1e-2, abs=1e-4)
    assert model.training  # restored after the eval-mode measurement
    page = monitor.to_html(tmp_path / "monitor.html")
    text = page.read_text()
    assert text.count("<svg") == 4 and "loss/sharpness" in text
    # the same charts as a section of the analyze report, which keeps all of its own sections
    report = monitor.to_html(tmp_path / "report.html", table=analyzed, title="trained MLP")
    text = report.read_text()
    for anchor in ("summary", "warnings", "depth", "layers", "skipped", "table", "training"):
        assert f'id="{anchor}"' in text
    section = text[text.index('id="training"'):text.index('id="skipped"')]
    assert section.count("<svg") == 4 and 'href="#training"' in text
    assert f"{last['loss/sharpness']:.4g}" in section and f"{last['2/alpha']:.4g}" in section  # last points
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # written atomically


def test_report_sections_are_checked_and_escaped(tmp_path):
    from spectrakit.analyze.report import ReportSection

    table = sk.analyze(torch.nn.Linear(16, 8), progress=False, farms=False)
    section = ReportSection(anchor="notes", heading="<b>mine</b>", body="<p>extra</p>")
    text = table.to_html(tmp_path / "r.html", sections=[section]).read_text()
    assert '<section id="notes" class="extra"><h2>&lt;b&gt;mine&lt;/b&gt;</h2><p>extra</p></section>' in text
    assert text.index('id="layers"') < text.index('id="notes"') < text.index('id="skipped"')
    for anchor in ("table", "bad id", ""):
        with pytest.raises(SpectrakitError, match="report section anchor"):
            table.to_html(tmp_path / "s.html", sections=[ReportSection(anchor=anchor, heading="x", body="")])
    assert not (tmp_path / "s.html").exists()
    with pytest.raises(SpectrakitError, match="no measurement yet"):
        sk.SpectralMonitor(torch.nn.Linear(4, 4)).report_section()


def test_training_metrics_need_a_loss():
    with pytest.raises(SpectrakitError, match="need loss_fn and batches"):
        sk.SpectralMonitor(torch.nn.Linear(4, 4), metrics=["sharpness"])
