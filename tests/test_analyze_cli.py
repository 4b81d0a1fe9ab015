"""sk.analyze and `spectrakit analyze`: metrics against float64 ground truth, bad input, outputs."""

import json
import math
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import spectrakit as sk
from spectrakit.cli import main
from spectrakit.errors import SpectrakitError


def truth_metrics(W):
    S = torch.linalg.svdvals(W.double())
    p = S / S.sum()
    return {
        "sigma_max": float(S[0]),
        "frobenius_norm": float(W.double().norm()),
        "stable_rank": float(W.double().norm() ** 2 / S[0] ** 2),
        "effective_rank": math.exp(float(-(p * p.log()).sum())),
        "condition_number": float(S[0] / S[-1]),
    }


def test_metrics_match_float64_ground_truth():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.GELU(), torch.nn.Linear(200, 50))
    table = sk.analyze(model, progress=False, method="exact")
    assert [row["shape"] for row in table] == ["200x300", "50x200"]
    for row, layer in zip(table, [model[0], model[2]]):
        expected = truth_metrics(layer.weight.detach())
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5), key
    # the default (auto → Gram for the 200x300 matrix) agrees on everything but the tail-sensitive cond
    auto = sk.analyze(model, progress=False)
    for key in ("sigma_max", "frobenius_norm", "stable_rank", "effective_rank"):
        assert auto.rows[0][key] == pytest.approx(table.rows[0][key], rel=1e-5)


def bad_state_dict():
    torch.manual_seed(0)
    nan = torch.randn(16, 8)
    nan[3, 2] = float("nan")
    return {
        "good.weight": torch.randn(16, 8),
        "nan.weight": nan,
        "zero.weight": torch.zeros(16, 8),
        "int8.weight": torch.randint(-5, 5, (16, 8), dtype=torch.int8),
        "row.weight": torch.randn(1, 32),
        "half.weight": torch.randn(16, 8).half(),
    }


def test_bad_tensors_are_skipped_with_reasons_and_the_rest_is_complete(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file(bad_state_dict(), str(path))
    table = sk.analyze(str(path), progress=False)
    status = {row["name"]: (row["status"], row["reason"]) for row in table}
    assert len(table) == 6
    assert status["good.weight"] == ("ok", "")
    assert status["half.weight"][0] == "ok"
    assert "NaN" in status["nan.weight"][1]
    assert "all-zero" in status["zero.weight"][1]
    assert "int8" in status["int8.weight"][1]
    assert "1x32" in status["row.weight"][1]
    assert table.summary()["analyzed"] == 2 and table.summary()["skipped"] == 4
    half = table["half.weight"]
    assert half["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(
        bad_state_dict()["half.weight"].double())[0]), rel=1e-5)


def test_meta_module_is_skipped():
    with torch.device("meta"):
        model = torch.nn.Linear(8, 4)
    table = sk.analyze(model, progress=False)
    assert table.rows[0]["status"] == "skipped" and "meta" in table.rows[0]["reason"]


def test_exports_round_trip(tmp_path):
    table = sk.analyze(torch.nn.Linear(40, 30), progress=False)
    table.to_csv(tmp_path / "t.csv")
    table.to_json(tmp_path / "t.json")
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["rows"][0]["stable_rank"] == pytest.approx(table.rows[0]["stable_rank"])
    assert document["summary"]["analyzed"] == 1
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert "stable_rank" in header and "effective_rank" in header
    pandas = pytest.importorskip("pandas")
    frame = table.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and frame.shape[0] == 1


def test_atomic_write_leaves_old_file_on_crash(tmp_path, monkeypatch):
    table = sk.analyze(torch.nn.Linear(10, 10), progress=False)
    target = tmp_path / "t.json"
    target.write_text("old")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", explode)
    with pytest.raises(KeyboardInterrupt):
        table.to_json(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_bad_method_raises_our_error():
    with pytest.raises(SpectrakitError, match="method"):
        sk.analyze(torch.nn.Linear(4, 4), method="bogus", progress=False)


# --- the command line ------------------------------------------------------------------------

def test_cli_analyze_writes_outputs(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(20, 10), "b.weight": torch.randn(5, 20)}, str(path))
    code = main(["analyze", str(path), "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "a.weight" in printed and "stable rank" in printed
    rows = json.loads((tmp_path / "out" / "spectra.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["a.weight", "b.weight"]
    assert (tmp_path / "out" / "spectra.csv").read_text().count("\n") == 3


class NotWeights:
    pass


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "pickle", "option"])
def test_cli_user_errors_print_one_line(tmp_path, case):
    args = ["analyze"]
    if case == "missing":
        args.append(str(tmp_path / "nope.safetensors"))
    elif case == "truncated":
        path = tmp_path / "cut.safetensors"
        save_file({"w": torch.randn(64, 64)}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        args.append(str(path))
    elif case == "garbage":
        path = tmp_path / "junk.safetensors"
        path.write_bytes(b"\x00\xff" * 100)
        args.append(str(path))
    elif case == "pickle":
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps({"w": NotWeights()}))
        args.append(str(path))
    else:
        args += ["--method", "bogus"]
    args += ["--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-m", "spectrakit.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spectrakit") and "Traceback" not in result.stderr
    if case not in ("option",):
        expected = "nope.safetensors" if case == "missing" else path.name
        assert expected in lines[0]


def test_cli_default_analyzes_reference_model(tmp_path):
    if not (sk.reference.REFERENCE_DIR / "model.safetensors").exists():
        pytest.skip("reference weights not built yet")
    code = main(["analyze", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    document = json.loads((tmp_path / "spectra.json").read_text())
    assert document["summary"]["analyzed"] >= 28  # 4 blocks x 7 projections, plus embeddings
    assert all(row["status"] == "ok" for row in document["rows"])
    html = (tmp_path / "report.html").read_text()
    assert "model.layers.3.mlp.down_proj.weight" in html and "alpha" in html


def test_cli_analysis_options(tmp_path):
    path = tmp_path / "conv.safetensors"
    kernel = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    save_file({"conv.weight": kernel, "fc.weight": torch.randn(30, 50)}, str(path))
    out = tmp_path / "out"
    code = main(["analyze", str(path), "--out", str(out), "--quiet", "--no-farms", "--no-html",
                 "--xmin", "median", "--conv-input", "6x6"])
    assert code == 0
    rows = {row["name"]: row for row in json.loads((out / "spectra.json").read_text())["rows"]}
    assert "farms_alpha" not in rows["fc.weight"] and not (out / "report.html").exists()
    operator = sk.linalg.conv_singular_values(kernel.double(), (6, 6))
    assert rows["conv.weight"]["sigma_max"] == pytest.approx(float(operator.max()), rel=1e-5)
    assert rows["fc.weight"]["num_pl_spikes"] == 15  # median x_min: the upper half of 30 eigenvalues


@pytest.mark.parametrize("flag", [["--xmin", "peak"], ["--conv-input", "0x3"]])
def test_cli_bad_analysis_options_print_one_line(tmp_path, flag):
    result = subprocess.run([sys.executable, "-m", "spectrakit.cli", "analyze", "--out", str(tmp_path), *flag],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and flag[0] in result.stderr


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os

    from spectrakit._atomic import atomic_write

    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "table.csv") as handle:
            handle.write("x\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o644
