"""`spectrakit hessian`: outputs on a tiny byte-level Llama folder, one-line errors."""

import json

import pytest
import torch

from spectrakit.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_writes_table_density_and_summary(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["hessian", str(tiny_folder), "--params", "model.layers.0.mlp.*", "--top", "2", "--trace",
                 "--probes", "6", "--density", "--steps", "6", "--density-probes", "2", "--per-layer",
                 "--seq-len", "8", "--float64", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "hessian.json").read_text())
    assert summary["parameters"] == 3 * 16 * 32 and len(summary["top_eigenvalues"]) == 2
    assert summary["top_eigenvalues"][0] >= summary["top_eigenvalues"][1]
    assert summary["density_method"] == "slq" and summary["density_moment1_stderr"] > 0  # n = 1536 > 6 × 2
    rows = json.loads((out / "per_layer.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                             "model.layers.0.mlp.down_proj"]
    lines = (out / "density.csv").read_text().splitlines()
    assert lines[0] == "eigenvalue,density" and len(lines) > 100
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bad_input_is_one_line(tiny_folder, tmp_path, capsys):
    assert main(["hessian", str(tiny_folder), "--top", "0", "--out", str(tmp_path / "a")]) == 2
    assert "nothing to compute" in capsys.readouterr().err
    assert main(["hessian", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Hugging Face model folder" in err[0]
    assert main(["hessian", str(tiny_folder), "--params", "nothing.*", "--out", str(tmp_path / "c")]) == 2
    assert "matches no parameter" in capsys.readouterr().err
