"""Overhead of ``SpectralMonitor`` in a training loop, against the same loop without it.

Run:  python bench/monitor.py [--steps 60] [--every 10]   (also runs every=1, the worst case)

Fine-tunes the bundled reference model on the docs corpus (AdamW, batch 8 × 128
bytes) and times the whole loop in one process: without a monitor, then with
``SpectralMonitor`` measuring every ``--every`` steps, for several metric sets. The
overhead is (loop time with monitor) / (loop time without) − 1. The cheap default
metrics use persistent power iteration; ``effective_rank`` needs full spectra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import best_of, machine, markdown_table  # noqa: E402
from spectrakit import data  # noqa: E402
from spectrakit.adapt.train import lm_loss  # noqa: E402

METRIC_SETS = {
    "default (sigma_max, stable_rank)": ("sigma_max", "stable_rank"),
    "+ frobenius_norm, topk_energy": ("sigma_max", "stable_rank", "frobenius_norm", "topk_energy"),
    "+ effective_rank (full spectra)": ("sigma_max", "stable_rank", "effective_rank"),
}


def train_loop(steps: int, batches: list[torch.Tensor], metrics: tuple[str, ...] | None, every: int) -> None:
    torch.manual_seed(0)
    model = sk.reference_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with tempfile.TemporaryDirectory() as folder:
        monitor = None if metrics is None else sk.SpectralMonitor(
            model, every=every, metrics=metrics, csv_path=Path(folder) / "spectra.csv")
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            lm_loss(model, batches[step]).backward()
            optimizer.step()
            if monitor is not None:
                monitor.step(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    batches = list(data.byte_batches(data.docs_corpus("train"), 8, 128, seed=0, steps=args.steps))
    plain = best_of(lambda: train_loop(args.steps, batches, None, args.every), args.repeats)[0]
    rows = [["no monitor (plain torch loop)", plain, plain / args.steps, 0.0]]
    for every in (args.every, 1):
        for label, metrics in METRIC_SETS.items():
            seconds = best_of(lambda metrics=metrics, every=every: train_loop(args.steps, batches, metrics, every),
                              args.repeats)[0]
            rows.append([label, every, seconds, seconds / args.steps, 100 * (seconds / plain - 1)])
    rows[0].insert(1, "–")
    print(f"{args.steps} steps, 30 weight matrices\n")
    print(markdown_table(["run", "every", "loop s", "s / step", "overhead %"], rows))


if __name__ == "__main__":
    main()
