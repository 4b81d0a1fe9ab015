"""Every tutorial in docs/tutorials runs here, and its result is checked against ground truth."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import spectrakit as sk
from spectrakit.adapt import AdaptedLinear

TUTORIALS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")


def run_tutorial(name: str, out: Path, capsys: pytest.CaptureFixture[str]):
    """Run a tutorial's ``main`` with its defaults; hand its page the figures and printout."""
    sys.path.insert(0, str(TUTORIALS))
    try:
        spec = importlib.util.spec_from_file_location(f"tutorial_{name}", TUTORIALS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.main(out)
        import tutorial_output

        tutorial_output.publish(TUTORIALS / f"{name}.py", out, capsys.readouterr().out)
        return result
    finally:
        sys.path.remove(str(TUTORIALS))


def test_every_tutorial_has_a_page_and_a_test():
    scripts = {p.stem for p in TUTORIALS.glob("*.py")} - {"tutorial_output"}
    pages = {p.stem for p in TUTORIALS.glob("*.md")}
    tested = {name[len("test_tutorial_"):] for name in globals() if name.startswith("test_tutorial_")}
    assert scripts == pages == tested


def test_tutorial_analyze(tmp_path, capsys):
    from safetensors import safe_open

    result = run_tutorial("analyze", tmp_path, capsys)
    table = result["table"]
    with safe_open(sk.reference.reference_weights_path(), "pt") as handle:
        matrices = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    matrices = {k: s for k, s in matrices.items() if len(s) == 2}
    assert {row["name"] for row in table.analyzed} == set(matrices)
    alphas = [row["alpha"] for row in table.analyzed]
    assert result["summary"]["mean_alpha"] == pytest.approx(sum(alphas) / len(alphas))
    html = (tmp_path / "report.html").read_text()
    assert "model.layers.0.mlp.down_proj.weight" in html
    assert (tmp_path / "alpha.png").stat().st_size > 10_000
    assert len((tmp_path / "spectra.csv").read_text().splitlines()) == len(matrices) + 1


def test_tutorial_regularize(tmp_path, capsys):
    runs = run_tutorial("regularize", tmp_path, capsys)
    plain, penalized = runs["plain"], next(v for k, v in runs.items() if k != "plain")
    for run in (plain, penalized):
        exact = max(float(torch.linalg.svdvals(layer.weight.detach().double())[0])
                    for layer in run["model"] if isinstance(layer, torch.nn.Linear))
        assert run["sigma_max"][-1] == pytest.approx(exact, rel=1e-4)
    # The penalty pulls the largest σ₁ well below the unregularized run's.
    assert penalized["sigma_max"][-1] < 0.6 * plain["sigma_max"][-1]
    assert penalized["validation_accuracy"] > 0.9
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_tutorial_adapt(tmp_path, capsys):
    result = run_tutorial("adapt", tmp_path, capsys)
    assert result["init_gap"] < 1e-3 and result["merge_gap"] < 1e-3
    assert result["after"] < result["before"] - 0.1
    assert math.isclose(result["log"].evals[-1][1], result["after"], rel_tol=1e-6)
    # The merged model is plain nn.Linear again: no adapter parameters remain.
    model = result["model"]
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    # The saved adapter, loaded onto a fresh base model, gives the trained model's outputs.
    fresh = sk.load_adapter(sk.reference_model(), tmp_path / "adapter.safetensors")
    dense = sk.reference_model()
    expected = sum(8 * (m.in_features + m.out_features) for name, m in dense.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert sk.trainable_parameters(fresh) == expected
    probe = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        gap = (fresh(probe).logits - model(probe).logits).abs().max()
    assert gap < 1e-3
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000


def test_tutorial_compress(tmp_path, capsys):
    result = run_tutorial("compress", tmp_path, capsys)
    assert math.isfinite(result["dense"])
    for (method, ratio), (report, bpb, counted) in result["reports"].items():
        assert report.parameters_after == counted, method
        assert report.ratio == pytest.approx(ratio, abs=0.01), (method, ratio)
        assert bpb < result["dense"] + 0.5
    assert (tmp_path / "compression.png").stat().st_size > 10_000


def test_tutorial_optimize(tmp_path, capsys):
    runs = run_tutorial("optimize", tmp_path, capsys)
    for name, run in runs.items():
        assert run["losses"][-1] < run["losses"][0] - 0.5, name
        assert math.isfinite(run["bits_per_byte"])
        # One optimizer steps every parameter of the model exactly once.
        stepped = [p for group in run["optimizer"].param_groups for p in group["params"]]
        assert len({id(p) for p in stepped}) == len(stepped)
        assert {id(p) for p in stepped} == {id(p) for p in run["model"].parameters()}
    muon_groups = [g for g in runs["muon"]["optimizer"].param_groups if not g.get("adamw")]
    assert muon_groups and all(p.ndim == 2 for g in muon_groups for p in g["params"])
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
