"""``spectrakit pretrain`` and ``spectrakit finetune --optimizer``: a tiny real run each,
held-out bits per byte reported, outputs readable; bad options one line and exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from spectrakit.cli import main

pytest.importorskip("transformers")

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--quiet"]


def test_pretrain_writes_model_and_bits_per_byte_and_is_seeded(tmp_path) -> None:
    for run in ("a", "b"):
        assert main(["pretrain", "--optimizer", "adamw", "--option", "eps=1e-7", *TINY,
                     "--out", str(tmp_path / run)]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["optimizer"] == "adamw" and metrics["options"] == {"eps": 1e-7}
    assert math.isfinite(metrics["heldout_bpb"])
    assert 4 < metrics["heldout_bpb"] < 9  # a fresh init two steps in: about log2(256) = 8
    assert metrics["optimizer_state_bytes"] > 0 and metrics["routing"][0].startswith("adamw")
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b"))
    assert a["model.layers.0.mlp.up_proj.weight"].shape == (688, 256)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "llama"


def test_finetune_with_muon_on_the_adapter(tmp_path) -> None:
    assert main(["finetune", "--method", "lora", "--optimizer", "muon", *TINY, "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["optimizer"] == "muon" and math.isfinite(metrics["heldout_bpb_after"])


@pytest.mark.parametrize("argv", [["pretrain", "--lr", "-1"], ["pretrain", "--optimizer", "lion"],
                                  ["pretrain", "--option", "momentum=2", *TINY]])
def test_bad_options_are_one_line_and_exit_2(argv: list[str], tmp_path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not (tmp_path / "out").exists()
