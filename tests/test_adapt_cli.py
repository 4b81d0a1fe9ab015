"""``spectrakit finetune``: runs end to end on the reference model, atomic outputs, one-line errors."""

from __future__ import annotations

import json

import pytest

import spectrakit as sk
from spectrakit.cli import main

pytest.importorskip("transformers")


def _reference_available() -> bool:
    try:
        sk.reference.reference_weights_path()
        return True
    except sk.SpectrakitError:
        return False


@pytest.mark.skipif(not _reference_available(), reason="reference model not built")
def test_finetune_writes_adapter_and_metrics(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    status = main(["finetune", "--method", "svfit", "--rank", "4", "--steps", "3", "--batch-size", "2",
                   "--seq-len", "32", "--eval-windows", "4", "--out", str(out), "--quiet"])
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "svfit" and metrics["steps"] == 3
    model = sk.reference_model()
    assert metrics["trainable_parameters"] == 4 * 28  # 4 blocks × 7 projections, r values each
    assert metrics["heldout_bpb_after"] < 8.0
    sk.load_adapter(model, out / "adapter.safetensors")
    assert sk.trainable_parameters(model) == metrics["trainable_parameters"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "metrics.json"]


def test_finetune_bad_input_is_one_line(capsys) -> None:
    assert main(["finetune", "--method", "nope", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown adapter method 'nope'" in err and err.count("\n") == 1
    assert main(["finetune", "--method", "lora", "--option", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
