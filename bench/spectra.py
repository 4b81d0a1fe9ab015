"""Full spectra of every weight matrix: spectrakit vs. plain torch vs. weightwatcher.

Run:  python bench/spectra.py [--repeats 3] [--skip-ww] [--models gpt2,reference]

For each model it times, in one process on the same matrices:
  * ``spectrakit.analyze`` (spectra + the per-matrix metrics table);
  * ``spectrakit.linalg.svdvals`` over ``iter_matrices`` (spectra only);
  * the plain-torch floor: ``eigvalsh`` of the smaller Gram matrix in fp32;
  * a plain ``torch.linalg.svdvals`` loop (fp32);
  * ``weightwatcher.WeightWatcher(model).analyze()`` (default settings: it also fits
    power laws, so it does more work per matrix than the others).
Then the like-for-like comparison of issue 3: ``spectrakit.analyze`` with the
weightwatcher-parity metrics (and, separately, with FARMS too) on exactly the matrices
weightwatcher analyzes, against weightwatcher's ``analyze()``, with the parity figures
(relative gaps of ``spectral_norm`` and ``stable_rank``, absolute gaps of ``alpha``).
It then streams the GPT-2 safetensors file through ``iter_matrices`` in a fresh
process and reports its peak resident memory next to the largest tensor and the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import best_of, machine, markdown_table  # noqa: E402


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def matrices(model) -> list[torch.Tensor]:
    return [record.matrix() for record in sk.weights.iter_matrices(model)]


def gram_floor(mats: list[torch.Tensor]) -> None:
    for W in mats:
        G = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
        torch.linalg.eigvalsh(G)


def svdvals_loop(mats: list[torch.Tensor]) -> None:
    for W in mats:
        torch.linalg.svdvals(W)


def spectrakit_spectra(model) -> None:
    for record in sk.weights.iter_matrices(model):
        sk.linalg.svdvals(record.matrix())


def weightwatcher_analyze(model):
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze()


def unrefined(run):
    """``run()`` with σ_min taken from the fp32 spectrum as is (the behaviour before the float64
    refinement of :mod:`spectrakit.analyze.conditioning`), to time what the refinement costs."""
    from spectrakit.analyze import run as analyze_run

    def spectrum_only(matrix, spectrum, **_):
        return {"sigma_min": float(spectrum[-1]), "condition_number": float(spectrum[0] / spectrum[-1]),
                "sigma_min_method": "spectrum", "sigma_min_bound": None}

    refined = analyze_run.conditioning_metrics
    analyze_run.conditioning_metrics = spectrum_only
    try:
        return run()
    finally:
        analyze_run.conditioning_metrics = refined


def parity(model, repeats: int) -> tuple[list[list[object]], dict[str, float]]:
    """spectrakit's parity metrics vs weightwatcher's analyze(), on weightwatcher's matrices.

    The three runs are interleaved round by round, and each round's ratio is taken against
    that round's weightwatcher time, so that a load change on a shared machine hits both
    sides of a ratio alike; the table gives the best and median time of each run and the
    median of the per-round ratios.
    """
    import weightwatcher  # noqa: F401  (import time is not analysis time)

    frames = [weightwatcher_analyze(model)]  # warm-up round, also the reference values
    reference = {row["longname"]: row for row in frames[-1].to_dict("records")}
    names = [r.name for r in sk.weights.iter_matrices(model) if r.name.removesuffix(".weight") in reference]
    tables = []
    runs = {
        "weightwatcher analyze()": lambda: weightwatcher_analyze(model),
        "spectrakit analyze(farms=False)": lambda: tables.append(
            sk.analyze(model, include=names, farms=False, progress=False)),
        "spectrakit analyze() (+ FARMS)": lambda: sk.analyze(model, include=names, progress=False),
        "spectrakit analyze(farms=False), σ_min unrefined": lambda: unrefined(
            lambda: sk.analyze(model, include=names, farms=False, progress=False)),
    }
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            seconds[label].append(best_of(run, 1)[0])
    ww = seconds["weightwatcher analyze()"]
    timed = {label: (min(times), statistics.median(times),
                     statistics.median(w / t for w, t in zip(ww, times))) for label, times in seconds.items()}
    gaps = {"spectral_norm": [], "stable_rank": [], "alpha": []}
    for row in tables[0].analyzed:
        theirs = reference[row["name"].removesuffix(".weight")]
        gaps["spectral_norm"].append(abs(row["spectral_norm"] / theirs["spectral_norm"] - 1))
        gaps["stable_rank"].append(abs(row["stable_rank"] / theirs["stable_rank"] - 1))
        gaps["alpha"].append(abs(row["alpha"] - theirs["alpha"]))
    figures = {"matrices": len(gaps["alpha"]),
               "max_rel_gap_spectral_norm": max(gaps["spectral_norm"]),
               "max_rel_gap_stable_rank": max(gaps["stable_rank"]),
               "median_abs_gap_alpha": statistics.median(gaps["alpha"]),
               "max_abs_gap_alpha": max(gaps["alpha"])}
    rows = [[label, best, median, ratio] for label, (best, median, ratio) in timed.items()]
    return rows, figures


# VmHWM (peak RSS of this process image) rather than ru_maxrss, which survives exec().
PEAK_SCRIPT = r"""
import sys, torch, spectrakit as sk
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.set_num_threads(1)
sk.linalg.svdvals(torch.randn(64, 64))  # warm up the kernels before the baseline
base = status("VmRSS")
largest = 0
for record in sk.weights.iter_matrices(sys.argv[1]):
    W = record.matrix()
    largest = max(largest, W.numel() * W.element_size())
    sk.linalg.svdvals(W)
    del W
print(status("VmHWM") - base, largest)
"""


def streaming_peak(model) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        path = os.path.join(folder, "model.safetensors")
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, path], capture_output=True,
                             text=True, check=True).stdout.split()
        growth, largest = float(out[0]), float(out[1])
        return {"file_mb": os.path.getsize(path) / 2**20, "largest_tensor_mb": largest / 2**20,
                "peak_rss_growth_mb": growth / 2**20}


def bench_model(name: str, model, repeats: int, with_ww: bool) -> list[list[object]]:
    mats = matrices(model)
    timings = {
        "spectrakit analyze()": best_of(lambda: sk.analyze(model, progress=False), repeats),
        "spectrakit svdvals loop": best_of(lambda: spectrakit_spectra(model), repeats),
        "torch Gram+eigvalsh fp32 (floor)": best_of(lambda: gram_floor(mats), repeats),
        "torch.linalg.svdvals loop": best_of(lambda: svdvals_loop(mats), repeats),
    }
    floor = timings["torch Gram+eigvalsh fp32 (floor)"][0]
    analyze_time = timings["spectrakit analyze()"][0]
    rows = []
    for label, (best, median) in timings.items():
        rows.append([name, len(mats), label, best, median, best / floor, best / analyze_time])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ww", action="store_true", help="skip weightwatcher (slow)")
    parser.add_argument("--models", default="gpt2,reference")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    print(f"machine: {machine()}\n")
    rows, parity_rows, parity_figures, peak = [], [], {}, None
    for name in args.models.split(","):
        model = gpt2_small() if name == "gpt2" else sk.reference_model()
        rows += bench_model(name, model, args.repeats, not args.skip_ww)
        if not args.skip_ww:
            timed, parity_figures[name] = parity(model, args.repeats)
            parity_rows += [[name, *row] for row in timed]
        if name == "gpt2":
            peak = streaming_peak(model)
        del model
    header = ["model", "matrices", "method", "best s", "median s", "× floor", "× spectrakit analyze"]
    print("Full spectra of every matrix\n")
    print(markdown_table(header, rows))
    if parity_rows:
        print("\nweightwatcher-parity metrics on weightwatcher's own matrices\n")
        print(markdown_table(["model", "run", "best s", "median s",
                                      "weightwatcher ÷ this (median of per-round ratios)"], parity_rows))
        print()
        figure_rows = [[name, *figures.values()] for name, figures in parity_figures.items()]
        print(markdown_table(["model", *next(iter(parity_figures.values())).keys()], figure_rows))
    if peak:
        print(f"\nstreaming GPT-2 safetensors ({peak['file_mb']:.0f} MB, largest tensor "
              f"{peak['largest_tensor_mb']:.0f} MB): peak RSS growth {peak['peak_rss_growth_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows, "parity_rows": parity_rows,
                                               "parity": parity_figures, "streaming": peak}, indent=1))


if __name__ == "__main__":
    main()
