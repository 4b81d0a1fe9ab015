"""Step-time overhead of every regularizer on the continual-learning MLP, against a plain torch step.

Run:  python bench/regularize_overhead.py                 (≈ 3 min on 2 cores, one thread)
      python bench/regularize_overhead.py --batches 128 --rounds 3 --steps 20   (quick look)
      python bench/regularize_overhead.py --only "SpectralPenalty (power" L2Penalty --rounds 25 --steps 100
                                                 (a few configurations, more samples)

One process, one thread. The anchor is the plain step — forward, cross-entropy, backward,
Adam — of the MLP of ``bench/continual.py`` (64 → 256 → 256 → 10) on digits batches. Each
regularized step adds ``λ·penalty()`` (λ small so the weights stay put). Configurations are
interleaved round by round (in an order that rotates every round) with the anchor re-timed in every round, and each
ratio is the
median over rounds of (regularized step) / (anchor step of the same round), which cancels the
slow drift of a shared machine. ``SpectralPenalty`` runs with persistent power iteration (one
step per call, the default), every 4th call, and with the exact SVD; parametrizations are
compared with torch's own ``torch.nn.utils.parametrizations.spectral_norm`` and ``weight_norm``.
Writes ``docs/benchmarks/regularize_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine, markdown_table  # noqa: E402
from continual import mlp  # noqa: E402
from spectrakit._atomic import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
R = sk.regularize
LAMBDA = 1e-6

WEIGHT_PENALTIES: dict[str, Callable] = {
    "SpectralPenalty (power, 1 step/call)": lambda m: R.SpectralPenalty(m),
    "SpectralPenalty (power, update_every=4)": lambda m: R.SpectralPenalty(m, update_every=4),
    "SpectralPenalty (exact SVD)": lambda m: R.SpectralPenalty(m, method="exact"),
    "L2Penalty": lambda m: R.L2Penalty(m),
    "L2ToInit": lambda m: R.L2ToInit(m),
    "WassersteinToInit": lambda m: R.WassersteinToInit(m),
    "SoftOrthogonality so": lambda m: R.SoftOrthogonality(m, "so"),
    "SoftOrthogonality srip": lambda m: R.SoftOrthogonality(m, "srip"),
    "SoftOrthogonality biggan": lambda m: R.SoftOrthogonality(m, "biggan"),
    "SoftOrthogonality group": lambda m: R.SoftOrthogonality(m, "group"),
    "OrthogonalConvPenalty (1-tap)": lambda m: R.OrthogonalConvPenalty(m, kinds="linear"),
    "NuclearNormPenalty": lambda m: R.NuclearNormPenalty(m),
    "HypersphericalEnergy": lambda m: R.HypersphericalEnergy(m),
    "CauchySchwarzOrthogonality": lambda m: R.CauchySchwarzOrthogonality(m),
    "LipschitzPenalty (Gram, 6 it.)": lambda m: R.LipschitzPenalty(m),
    "LambdaOrthogonality (λ=1)": lambda m: R.LambdaOrthogonality(m, lam=1.0),
    "CauchySchwarzDiscrete binary": lambda m: R.CauchySchwarzDiscrete(m, "binary"),
    "CauchySchwarzDiscrete ternary": lambda m: R.CauchySchwarzDiscrete(m, "ternary"),
}
# applied through the optimizer (Penalty.attach) instead of the loss: same update
ATTACHED: dict[str, Callable] = {
    "SpectralPenalty (power, attached to the optimizer)": lambda m: R.SpectralPenalty(m),
}
FEATURE_LOSSES = {
    "VNE (hidden features)": lambda: R.VNE(),
    "VICReg (hidden features)": lambda: R.VICReg(),
    "LDReg (hidden features, k=64)": lambda: R.LDReg(k=64),
}
# recipes that change more than the loss: orthonormal start + penalty + backward-error hooks
RECIPES = {
    "orthonormal_modulation (penalty + backward hooks)": lambda m: R.orthonormal_modulation(m)[0],
}
PARAMETRIZATIONS = {
    "torch spectral_norm (anchor)": lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    "sk spectral_normalize": lambda layer: R.spectral_normalize(layer),
    "torch weight_norm (anchor)": lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    "sk weight_normalize": lambda layer: R.weight_normalize(layer),
    "sk learnable_multipliers (row)": lambda layer: R.learnable_multipliers(layer, "row"),
}


def make_step(kind: str, name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    """A closure running one training step of a fresh model with the configuration applied."""
    X, y = batch
    model = mlp(0)
    penalty = feature_loss = None
    if kind == "weights":
        penalty = WEIGHT_PENALTIES[name](model)
    elif kind == "recipe":
        penalty = RECIPES[name](model)
    elif kind == "attached":
        attached = ATTACHED[name](model)
    elif kind == "parametrization":
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                PARAMETRIZATIONS[name](layer)
    elif kind == "features":
        feature_loss = FEATURE_LOSSES[name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if kind == "attached":
        attached.attach(optimizer, LAMBDA)
    body, head = model[:-1], model[-1]
    start = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    def step() -> None:
        if kind == "jacobian":
            x = X.requires_grad_(True)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + LAMBDA * R.JacobianPenalty(seed=0)(x, logits)
        elif feature_loss is not None:
            hidden = body(X)
            loss = F.cross_entropy(head(hidden), y) + LAMBDA * feature_loss(hidden)
        else:
            loss = F.cross_entropy(model(X), y)
            if penalty is not None:
                loss = loss + LAMBDA * penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def restart() -> None:
        model.load_state_dict(start[0])
        optimizer.load_state_dict(start[1])

    step.restart = restart  # type: ignore[attr-defined]
    return step


def timed(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(batch_size: int, rounds: int, steps: int, only: list[str] | None = None) -> list[dict]:
    X, y = sk.data.digits("train")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(y), (batch_size,), generator=g)
    batch = (X[idx], y[idx])
    configs = ([("anchor", "plain torch step")] + [("weights", n) for n in WEIGHT_PENALTIES]
               + [("attached", n) for n in ATTACHED] + [("recipe", n) for n in RECIPES]
               + [("features", n) for n in FEATURE_LOSSES] + [("jacobian", "JacobianPenalty (1 projection)")]
               + [("parametrization", n) for n in PARAMETRIZATIONS])
    if only:
        configs = configs[:1] + [(kind, name) for kind, name in configs[1:] if any(o in name for o in only)]
    steppers = {name: make_step(kind, name, batch) for kind, name in configs}
    for step in steppers.values():  # warm-up: allocator, first-call paths
        timed(step, 5)
    times: dict[str, list[float]] = {name: [] for _, name in configs}
    ratios: dict[str, list[float]] = {name: [] for _, name in configs}
    names = [name for _, name in configs]
    for round_index in range(rounds):
        # the order rotates every round, so no configuration always runs next to the anchor
        shift = round_index % len(names)
        seconds = {}
        for name in names[shift:] + names[:shift]:
            # every round restarts from the initial weights, so every round times the same
            # work: thousands of steps on one batch drive the gradients and Adam's moments
            # into subnormal floats, which slows a step up to 3x depending on the trajectory
            steppers[name].restart()
            seconds[name] = timed(steppers[name], steps)
        for name in names:
            times[name].append(seconds[name])
            if name != "plain torch step":
                ratios[name].append(seconds[name] / seconds["plain torch step"])
    rows = []
    for kind, name in configs:
        rows.append({"batch": batch_size, "kind": kind, "name": name,
                     "step_ms": 1e3 * statistics.median(times[name]),
                     "ratio": statistics.median(ratios[name]) if ratios[name] else 1.0,
                     # the spread over rounds: how far one round's ratio can be trusted
                     "ratio_quartiles": (statistics.quantiles(ratios[name], n=4)[::2]
                                         if len(ratios[name]) > 1 else [1.0, 1.0])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="only the configurations whose name contains one of these (plus the plain step)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "regularize_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch_size in args.batches:
        rows += measure(batch_size, args.rounds, args.steps, args.only)
    print(f"Machine: {machine()}")
    header = (["configuration"] + [f"batch {b}: ms/step" for b in args.batches]
              + [f"batch {b}: × plain (quartiles over rounds)" for b in args.batches])
    names = list(dict.fromkeys(r["name"] for r in rows))
    table = []
    for name in names:
        mine = {r["batch"]: r for r in rows if r["name"] == name}
        table.append([name] + [round(mine[b]["step_ms"], 3) for b in args.batches]
                     + [f"{mine[b]['ratio']:.2f} ({low:.2f}–{high:.2f})"
                        for b in args.batches for low, high in [mine[b]["ratio_quartiles"]]])
    print(markdown_table(header, table))
    result = {"command": " ".join(["python", "bench/regularize_overhead.py", *sys.argv[1:]]),
              "machine": machine(), "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
