"""SpectralMonitor: estimates against exact spectra during training, CSV log, Trainer callback."""

import csv

import pytest
import torch

import spectrakit as sk
from spectrakit.errors import SpectrakitError


def test_tracks_exact_metrics_during_training(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5))
    monitor = sk.SpectralMonitor(model, every=5, metrics=["sigma_max", "stable_rank", "frobenius_norm",
                                                          "topk_energy", "effective_rank"],
                                 csv_path=tmp_path / "log.csv", k=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 20), torch.randn(64, 5)
    for step in range(200):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        monitor.step(step)
    assert [row["step"] for row in monitor.history] == list(range(0, 200, 5))
    last = monitor.history[-1]
    for name, layer in (("0", model[0]), ("2", model[2])):
        S = torch.linalg.svdvals(layer.weight.detach().double())
        assert last[f"{name}/sigma_max"] == pytest.approx(float(S[0]), rel=1e-4)
        assert last[f"{name}/stable_rank"] == pytest.approx(float(S.square().sum() / S[0] ** 2), rel=1e-3)
        assert last[f"{name}/topk_energy"] == pytest.approx(float(S[:5].square().sum() / S.square().sum()), rel=1e-3)
        p = S / S.sum()
        assert last[f"{name}/effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    with open(tmp_path / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and float(rows[-1]["0/sigma_max"]) == pytest.approx(last["0/sigma_max"])


def test_trainer_callback_calls_step():
    pytest.importorskip("transformers")
    model = torch.nn.Linear(8, 8)
    monitor = sk.SpectralMonitor(model, every=2)
    callback = monitor.callback()

    class State:
        global_step = 4

    callback.on_step_end(None, State(), None)
    assert monitor.history[-1]["step"] == 4
    from transformers import TrainerCallback

    assert isinstance(callback, TrainerCallback)


def test_bad_options():
    with pytest.raises(SpectrakitError, match="unknown"):
        sk.SpectralMonitor(torch.nn.Linear(2, 2), metrics=["alpha_hat"])
    with pytest.raises(SpectrakitError, match="no floating-point"):
        sk.SpectralMonitor(torch.nn.Linear(2, 2), include="nothing*")
