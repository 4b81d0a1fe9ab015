"""LSTM/GRU/RNN weights as per-gate matrices, from a module and from its saved files alike."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import spectrakit as sk
from spectrakit.weights.recurrent import GATES, gate_count

LSTM_GATES = ("input", "forget", "cell", "output")
GRU_GATES = ("reset", "update", "new")


class Speaker(torch.nn.Module):
    """A voice-encoder-shaped model: stacked LSTM, a bidirectional GRU, a GRU cell, an RNN, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(12, 16, num_layers=2, batch_first=True)
        self.gru = torch.nn.GRU(16, 8, bidirectional=True)
        self.cell = torch.nn.GRUCell(8, 6)
        self.rnn = torch.nn.RNN(6, 5)
        self.projected = torch.nn.LSTM(5, 7, proj_size=3)
        self.linear = torch.nn.Linear(16, 16)


def _expected(model: Speaker) -> dict[str, torch.Tensor]:
    """Every gate matrix, sliced here by hand from the stored parameters."""
    expected = {}
    for module, gates in [(model.lstm, LSTM_GATES), (model.gru, GRU_GATES), (model.cell, GRU_GATES),
                          (model.projected, LSTM_GATES)]:
        prefix = next(name for name, m in model.named_modules() if m is module)
        for name, param in module.named_parameters():
            if not name.startswith("weight_") or name.startswith("weight_hr"):
                continue
            rows = param.shape[0] // len(gates)
            for index, gate in enumerate(gates):
                expected[f"{prefix}.{name}.{gate}_gate"] = param.detach()[index * rows:(index + 1) * rows]
    return expected


@pytest.fixture
def speaker() -> Speaker:
    torch.manual_seed(0)
    return Speaker()


def test_gates_are_exact_slices_named_per_gate(speaker) -> None:
    records = {r.name: r for r in sk.iter_matrices(speaker)}
    expected = _expected(speaker)
    for name, truth in expected.items():
        assert records[name].kind == "recurrent"
        assert records[name].shape == tuple(truth.shape)
        assert torch.equal(records[name].load(), truth), name
    # one matrix each: an RNN's weights and an LSTM projection keep their names
    assert records["rnn.weight_ih_l0"].kind == records["projected.weight_hr_l0"].kind == "recurrent"
    assert records["linear.weight"].kind == "linear"
    assert not any(name.startswith("lstm.weight_ih_l0") and name not in expected for name in records)
    # gates=False: the stacked parameters under their own names, as before
    stacked = {r.name: r for r in sk.iter_matrices(speaker, gates=False)}
    assert stacked["lstm.weight_ih_l0"].shape == (64, 12) and "lstm.weight_ih_l0.input_gate" not in stacked


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_files_give_the_same_gate_records(speaker, tmp_path, suffix) -> None:
    state = {name: tensor.contiguous() for name, tensor in speaker.state_dict().items()}
    path = tmp_path / f"speaker{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:  # a training checkpoint wrapped as resemblyzer's is: {"model_state": ..., "step": ...}
        torch.save({"model_state": state, "step": 3}, path)
    from_module = {r.name: r for r in sk.iter_matrices(speaker)}
    from_file = {r.name: r for r in sk.iter_matrices(path)}
    assert from_file.keys() == from_module.keys()
    for name, record in from_file.items():
        assert record.kind == from_module[name].kind, name
        assert torch.equal(record.load(), from_module[name].load()), name


def test_analyze_reports_one_row_per_gate(speaker, tmp_path) -> None:
    table = sk.analyze(speaker, include="lstm.weight_hh_l1", progress=False, dtype=torch.float64)
    assert [row["name"] for row in table] == [f"lstm.weight_hh_l1.{gate}_gate" for gate in LSTM_GATES]
    for row, gate in zip(table, range(4)):
        truth = torch.linalg.svdvals(speaker.lstm.weight_hh_l1.detach().double()[16 * gate:16 * (gate + 1)])
        assert row["kind"] == "recurrent" and row["shape"] == "16x16"
        assert row["sigma_max"] == pytest.approx(float(truth[0]), rel=1e-9)
    path = tmp_path / "speaker.safetensors"
    save_file({k: v.contiguous() for k, v in speaker.state_dict().items()}, str(path))
    from_file = sk.analyze(path, include="lstm.weight_hh_l1", progress=False, dtype=torch.float64)
    assert [row["sigma_max"] for row in from_file] == pytest.approx([row["sigma_max"] for row in table])


def test_gate_count_needs_a_consistent_sibling() -> None:
    assert gate_count("l.weight_ih_l0", {"l.weight_ih_l0": (40, 3), "l.weight_hh_l0": (40, 10)}) == 4
    assert gate_count("l.weight_ih_l0", {"l.weight_ih_l0": (40, 3)}) is None  # no weight_hh: not ours to split
    assert gate_count("l.weight_ih_l0", {"l.weight_ih_l0": (50, 3), "l.weight_hh_l0": (50, 10)}) is None
    assert gate_count("l.weight_hh_l0", {"l.weight_hh_l0": (20, 10)}) is None  # two gates: no such layer
    assert set(GATES) == {3, 4}


def test_a_one_row_gate_is_skipped_with_its_reason() -> None:
    table = sk.analyze(torch.nn.LSTM(3, 1), progress=False)
    assert {row["status"] for row in table} == {"skipped"}
    assert all("degenerate 1x" in row["reason"] for row in table)
