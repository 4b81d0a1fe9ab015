"""Tutorial: keep every layer's σ₁ near 1 while training a digits classifier.

Two identical MLPs train on the sklearn digits with the same seed and batches; one adds
``λ · SpectralPenalty`` to its loss. Run ``python docs/tutorials/regularize.py [OUT_DIR]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tutorial_output import output_dir, pyplot

import spectrakit as sk


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(strength: float, steps: int = 300) -> dict:
    model = make_model()
    penalty = sk.regularize.SpectralPenalty(model, target=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = sk.data.digits("train")
    order = torch.Generator().manual_seed(0)
    history: dict[str, list[float]] = {"loss": [], "sigma_max": [], "sigma_steps": []}
    for step in range(steps):
        batch = torch.randint(0, len(y), (128,), generator=order)
        task = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss = task + strength * penalty() if strength else task
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["loss"].append(task.item())
        if step % 10 == 0 or step == steps - 1:
            history["sigma_steps"].append(step)
            history["sigma_max"].append(max(float(sk.linalg.spectral_norm(layer.weight.detach(), "exact"))
                                            for layer in model if isinstance(layer, nn.Linear)))
    x_val, y_val = sk.data.digits("validation")
    with torch.no_grad():
        history["validation_accuracy"] = float((model(x_val).argmax(1) == y_val).float().mean())
    history["model"] = model
    return history


def main(out: Path) -> dict:
    runs = {"plain": train(0.0), "spectral penalty (λ = 0.001)": train(0.001)}
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, run in runs.items():
        axes[0].plot(run["loss"], label=label)
        axes[1].plot(run["sigma_steps"], run["sigma_max"], label=label)
        print(f"{label}: final loss {run['loss'][-1]:.4f}, largest σ₁ {run['sigma_max'][-1]:.3f}, "
              f"validation accuracy {run['validation_accuracy']:.3f}")
    axes[0].set(xlabel="step", ylabel="cross-entropy", yscale="log", title="training loss")
    axes[1].set(xlabel="step", ylabel="max over layers of σ₁(W)", title="largest singular value")
    axes[1].axhline(1.0, color="gray", linestyle=":")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=110)
    plt.close(figure)
    return runs


if __name__ == "__main__":
    main(output_dir("regularize"))
