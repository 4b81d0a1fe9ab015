"""Continual learning on the sklearn digits: does spectral regularization keep an MLP trainable?

Run:  python bench/continual.py                       (full run: ≈ 10 min on 2 cores, one thread)
      python bench/continual.py --tasks 4 --steps 50 --seeds 1 --strengths 1e-3   (smoke test)

A task sequence of ``--tasks`` tasks on :func:`spectrakit.data.digits` (fixed splits):

* **permuted** — every task permutes the 64 pixels with its own fixed random permutation
  (labels unchanged); the test accuracy is on the validation split under the same permutation.
* **random-label** — every task draws fresh random labels for a fixed subset of
  ``--random-subset`` training images: pure memorization, the classic probe of plasticity
  (test accuracy is chance by construction and not reported).

One MLP (64 → 256 → 256 → 10, ReLU) is trained with Adam for ``--steps`` steps per task,
without any reset between tasks. Methods: none, L2 (to 0), L2 to init, Wasserstein to init,
spectral (``SpectralPenalty``, σ₁ → 1, biases → 0), λ-orthogonality (``LambdaOrthogonality``,
λ = 1) and orthonormality + modulation (``orthonormal_modulation``), each at every ``--strengths`` λ
(the loss is ``cross-entropy + λ·penalty``). After each task: the accuracy on the task's
whole training set (*plasticity*: can the net still fit the new task?) and on the test set.
Writes ``docs/benchmarks/regularize_continual.json`` and ``docs/img/regularize_continual.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine, markdown_table, save_figure  # noqa: E402
from spectrakit._atomic import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "L2": lambda model: sk.regularize.L2Penalty(model),
    "L2-init": lambda model: sk.regularize.L2ToInit(model),
    "Wasserstein-init": lambda model: sk.regularize.WassersteinToInit(model),
    "spectral": lambda model: sk.regularize.SpectralPenalty(model, target=1.0),
    # λ-orthogonality of every layer (λ = 1: within 1 of orthogonal in ‖WᵀW − I‖_F, free inside)
    "lambda-orth": lambda model: sk.regularize.LambdaOrthogonality(model, lam=1.0),
    # orthonormal re-initialization, ‖WᵀW − I‖² penalty and backward error modulation (Xie et al., 2017)
    "orthonormal-mod": lambda model: sk.regularize.orthonormal_modulation(model)[0],
}


def mlp(seed: int, hidden: int = 256) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def make_tasks(kind: str, n_tasks: int, seed: int, subset: int):
    """``[(X_train, y_train, X_test, y_test | None)]`` for one sequence."""
    X, y = sk.data.digits("train")
    Xv, yv = sk.data.digits("validation")
    g = torch.Generator().manual_seed(1000 + seed)
    tasks = []
    for _ in range(n_tasks):
        if kind == "permuted":
            perm = torch.randperm(64, generator=g)
            tasks.append((X[:, perm], y, Xv[:, perm], yv))
        else:
            labels = torch.randint(0, 10, (subset,), generator=g)
            tasks.append((X[:subset], labels, None, None))
    return tasks


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def run(kind: str, method: str, strength: float, seed: int, args) -> dict:
    model = mlp(seed)
    penalty = METHODS[method](model) if method != "none" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if penalty is not None and args.attach:  # the same update, applied in optimizer.step()
        penalty.attach(optimizer, strength)
        penalty = None
    g = torch.Generator().manual_seed(seed)
    train_acc, test_acc = [], []
    for X, y, Xt, yt in make_tasks(kind, args.tasks, seed, args.random_subset):
        for _ in range(args.steps):
            idx = torch.randint(0, len(y), (args.batch,), generator=g)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            if penalty is not None:
                loss = loss + strength * penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_acc.append(accuracy(model, X, y))
        test_acc.append(accuracy(model, Xt, yt) if Xt is not None else None)
    return {"kind": kind, "method": method, "strength": strength, "seed": seed,
            "train_acc": train_acc, "test_acc": test_acc}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarize(runs: list[dict], last: int) -> list[dict]:
    """Mean over seeds of the first task's and the last ``last`` tasks' accuracies, per config."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["method"], r["strength"]), []).append(r)
    rows = []
    for (kind, method, strength), rs in groups.items():
        rows.append({"kind": kind, "method": method, "strength": strength, "seeds": len(rs),
                     "first_train": mean([r["train_acc"][0] for r in rs]),
                     "last_train": mean([mean(r["train_acc"][-last:]) for r in rs]),
                     "last_test": mean([mean(r["test_acc"][-last:]) for r in rs]),
                     "min_seed_last_train": min(mean(r["train_acc"][-last:]) for r in rs)})
    return rows


def plot(runs: list[dict], rows: list[dict], path: Path, last: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "black", "L2": "tab:blue", "L2-init": "tab:orange", "Wasserstein-init": "tab:green",
              "spectral": "tab:red", "lambda-orth": "tab:purple", "orthonormal-mod": "tab:brown"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [("permuted", "train_acc", axes[0, 0], "permuted pixels: training accuracy (plasticity)"),
              ("permuted", "test_acc", axes[0, 1], "permuted pixels: test accuracy"),
              ("random-label", "train_acc", axes[1, 0], "random labels: training accuracy (plasticity)")]
    for kind, key, ax, title in panels:
        for method, color in colors.items():
            # each method at its best strength on this sequence (mean of the last tasks' metric)
            candidates = [r for r in rows if r["kind"] == kind and r["method"] == method]
            if not candidates:
                continue
            metric = "last_train" if key == "train_acc" else "last_test"
            best = max(candidates, key=lambda r: r[metric])
            curves = [r[key] for r in runs if r["kind"] == kind and r["method"] == method
                      and r["strength"] == best["strength"]]
            curve = [mean(values) for values in zip(*curves)]
            label = method if method == "none" else f"{method} (λ={best['strength']:g})"
            ax.plot(range(1, len(curve) + 1), curve, color=color, label=label, marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    ax = axes[1, 1]
    for method, color in colors.items():
        if method == "none":
            continue
        for kind, style in (("permuted", "-"), ("random-label", "--")):
            points = sorted((r["strength"], r["last_train"]) for r in rows
                            if r["kind"] == kind and r["method"] == method)
            if points:
                ax.plot(*zip(*points), style, color=color, marker="o", label=f"{method}, {kind}")
    for kind, style in (("permuted", "-"), ("random-label", "--")):
        base = [r["last_train"] for r in rows if r["kind"] == kind and r["method"] == "none"]
        if base:
            ax.axhline(base[0], color="black", linestyle=style, linewidth=1, label=f"none, {kind}")
    ax.set_xscale("log")
    ax.set_title(f"sensitivity: training accuracy of the last {last} tasks vs strength λ", fontsize=10)
    ax.set_xlabel("λ")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strengths", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--random-subset", type=int, default=128)
    parser.add_argument("--last", type=int, default=5, help="tasks averaged at the end of the sequence")
    parser.add_argument("--kinds", nargs="+", default=["permuted", "random-label"])
    parser.add_argument("--methods", nargs="+", default=["none", *METHODS])
    parser.add_argument("--attach", action="store_true",
                        help="apply each penalty through the optimizer (Penalty.attach) instead of the loss")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "regularize_continual.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "regularize_continual.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    configs = [("none", 0.0)] * ("none" in args.methods) + [(m, s) for m in METHODS if m in args.methods
                                                           for s in args.strengths]
    runs, start = [], time.perf_counter()
    for kind in args.kinds:
        for method, strength in configs:
            for seed in range(args.seeds):
                runs.append(run(kind, method, strength, seed, args))
            print(f"{kind:12s} {method:16s} λ={strength:<8g} last-{args.last} train acc "
                  f"{mean([mean(r['train_acc'][-args.last:]) for r in runs[-args.seeds:]]):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    elapsed = time.perf_counter() - start
    rows = summarize(runs, args.last)
    print()
    print(f"Machine: {machine()}; {elapsed:.0f} s")
    print(markdown_table(["sequence", "method", "λ", "task 1 train", f"last {args.last} train",
                          f"last {args.last} test", "worst seed"],
                         [[r["kind"], r["method"], f"{r['strength']:g}", round(r["first_train"], 3),
                           round(r["last_train"], 3),
                           "–" if r["last_test"] != r["last_test"] else round(r["last_test"], 3),
                           round(r["min_seed_last_train"], 3)] for r in rows]))
    result = {"command": " ".join(["python", "bench/continual.py", *sys.argv[1:]]), "machine": machine(),
              "seconds": elapsed, "args": vars(args), "summary": rows, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as handle:
        json.dump(result, handle, indent=1)
    plot(runs, rows, Path(args.plot), args.last)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
