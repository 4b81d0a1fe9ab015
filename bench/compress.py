"""Low-rank compression of the reference model: every method × allocation × ratio.

Run:  python bench/compress.py [--ratios 0.1,0.2,0.3,0.4,0.5] [--calib 16] [--windows 64]
                               [--repeats 3] [--gpt2-repeats 1] [--llama1b-repeats 1]
                               [--json docs/benchmarks/compress.json]
                               [--plot docs/img/compress_bpb.png] [--timing-only] [--memory-only]
      python bench/compress.py --second-half [--lora-lr 1e-4] [--ratios …] [--repeats 3] [--only m1,m2]
      python bench/compress.py --floor-only [--repeats 3];  python bench/compress.py --bound-only [--repeats 2]
      python bench/compress.py --lora-study [--ratios 0.3] [--windows 32]

On the bundled reference model (byte-level Llama pretrained on Python code), in one
process:

1. **Quality**: for each of ``svd``, ``asvd``, ``fwsvd``, ``svd-llm`` with ``uniform`` and
   ``global`` allocation at each ratio (fraction of the targeted weights removed, all
   linear layers but the output head), held-out **bits per byte** (next-byte
   cross-entropy / ln 2; perplexity per byte is ``2**bpb``) on
   ``eval_windows(code_corpus("validation"), 256, W)`` and
   ``eval_windows(docs_corpus("validation"), 256, W)``. Calibration: ``--calib``
   windows of 256 bytes from ``byte_batches(code_corpus("train"), 8, 256, seed=0)``.
2. **Time**: wall time of ``compress`` (calibration pass + SVDs + allocation + layer
   swap) for every method at ratio 0.3, best of ``--repeats``, as a multiple of plain
   ``svd``; ``svd-llm``'s time as the calibration set grows; and the same timings on two
   larger random models (a 768-wide Llama, GPT-2 small's architecture, one layer of
   Llama-3.2-1B's shape).
3. ``--second-half``: every method of the second half too (``gfwsvd``, ``svd-llm-v2``)
   with ``uniform`` and ``global`` allocation, each with and without ``lora_update``;
   svd-llm-v2's ``heterogeneous`` and asvd's ``sensitivity`` allocation; ``monarch`` and
   ``btt`` at low rank's parameters; and each method's time at ratio 0.3 against its floor
   (plain svd + the plain forward over the calibration batches, + one backward for
   fwsvd/gfwsvd), measured round by round.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectrakit as sk  # noqa: E402
from _common import machine, markdown_table, save_figure  # noqa: E402
from spectrakit import data  # noqa: E402
from spectrakit.adapt.train import bits_per_byte  # noqa: E402
from spectrakit.compress import CompressionWarning  # noqa: E402

METHODS = ("svd", "asvd", "fwsvd", "svd-llm")
ALLOCATIONS = ("uniform", "global")
SEQ_LEN = 256


def calibration(sequences: int) -> list[torch.Tensor]:
    steps = math.ceil(sequences / 8)
    batches = [b[:, :-1] for b in data.byte_batches(data.code_corpus("train"), 8, SEQ_LEN, seed=0, steps=steps)]
    batches[-1] = batches[-1][: sequences - 8 * (steps - 1)]
    return batches


def timed_compress(base: torch.nn.Module, **kwargs) -> tuple:
    model = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        start = time.perf_counter()
        report = sk.compress(model, **kwargs)
        seconds = time.perf_counter() - start
    return model, report, seconds, [str(w.message) for w in caught]


def wide_llama() -> torch.nn.Module:
    """A random Llama, hidden 768, MLP 2048, 2 layers: SVDs cost more relative to the
    calibration pass than on the reference model (SVD ∝ width³, forward ∝ width² per token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                                        num_attention_heads=12, num_key_value_heads=12, vocab_size=256,
                                        max_position_embeddings=512)).eval()


def llama_1b_layer() -> torch.nn.Module:
    """One decoder block (layer) of Llama-3.2-1B's shape (hidden 2048, MLP 8192, 32 heads, 8 key-value
    heads), random weights, a 256-token vocabulary: the per-layer cost of a 1B-parameter LLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=256,
                                        max_position_embeddings=512)).eval()


def gpt2_small() -> torch.nn.Module:
    """GPT-2 small's architecture (124 M parameters, Conv1D layers), random weights: the
    timings of a real-size model (they do not depend on the weights' values)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def model_timing(base: torch.nn.Module, repeats: int) -> dict[str, dict[str, float]]:
    """Each method at ratio 0.3 on ``base`` with 16 × 256 calibration tokens, best of ``repeats``."""
    calib = calibration(16)
    timing = {}
    for method in METHODS:
        runs = [timed_compress(base, method=method, ratio=0.3, calibration=calib) for _ in range(repeats)]
        best = min(runs, key=lambda run: run[2])
        timing[method] = {"seconds": best[2], "calibration_seconds": best[1].calibration_seconds}
    for method in METHODS:
        timing[method]["vs_svd"] = timing[method]["seconds"] / timing["svd"]["seconds"]
    return timing


_MEMORY_PROBE = """
import resource, sys
sys.path.insert(0, {bench!r})
import compress as bench
import spectrakit as sk
model, batches = bench.gpt2_small(), bench.calibration(16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sk.compress(model, method={method!r}, ratio=0.3, calibration=batches)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def memory_growth() -> dict[str, float]:
    """Peak resident memory growth (MB) of ``compress`` on GPT-2 small per method, each in a
    fresh process (``ru_maxrss`` after building the model and batches, then after compress)."""
    import subprocess

    growth = {}
    for method in METHODS:
        code = _MEMORY_PROBE.format(bench=str(Path(__file__).resolve().parent), method=method)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        growth[method] = float(result.stdout.strip().splitlines()[-1])
    return growth


def interleaved_timing(base: torch.nn.Module, calib: list[torch.Tensor], repeats: int) -> list[list[str]]:
    """Each method at ratio 0.3, round by round (so load changes hit every method alike);
    the best round of each, and its ratio to plain svd's best."""
    # every method decomposes through a float64 Gram eigensolve on the CPU; the extra row is
    # plain svd with float32 LAPACK SVD instead, the baseline before 2026-12-02 (3rd session)
    variants = {method: {"method": method} for method in METHODS}
    variants["svd, svd_method='exact'"] = {"method": "svd", "svd_method": "exact"}
    # and the floor under every calibrated method: the model's plain forward over the batches
    forward = "forward over the calibration batches only"
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in [*variants, forward]}
    for _ in range(repeats):
        for label, kwargs in variants.items():
            _, report, seconds, _ = timed_compress(base, ratio=0.3, calibration=calib, **kwargs)
            runs[label].append((seconds, report.calibration_seconds))
        with torch.no_grad():
            start = time.perf_counter()
            for batch in calib:
                base(batch)
            runs[forward].append((time.perf_counter() - start, 0.0))
    svd = min(runs["svd"])[0]
    return [[label, f"{min(times)[0]:.3f}", f"{min(times)[1]:.3f}", f"{min(times)[0] / svd:.2f}"]
            for label, times in runs.items()]


ALL_METHODS = ("svd", "asvd", "fwsvd", "gfwsvd", "svd-llm", "svd-llm-v2")
FISHER = ("fwsvd", "gfwsvd")
FLOOR_METHODS = (*ALL_METHODS, "modegpt")  # modegpt's floor is the same as svd-llm's (it decomposes less)


def second_half_configs(ratios: list[float]) -> list[dict]:
    """Every method × uniform/global × with/without lora_update; svd-llm-v2's heterogeneous and
    asvd's sensitivity allocation (with and without lora); Monarch and BTT at low rank's budget."""
    configs = []
    # the pairs the goals compare come first (gfwsvd vs fwsvd, v2 vs svd-llm, with vs without
    # lora), so that a run cut short on a loaded machine still answers them
    first = ("fwsvd", "gfwsvd", "svd-llm", "svd-llm-v2")
    order = [*first, *(m for m in ALL_METHODS if m not in first)]
    for ratio in ratios:
        for allocation in (*ALLOCATIONS, "heterogeneous", "sensitivity"):
            for method in order:
                if allocation == "heterogeneous" and method != "svd-llm-v2":
                    continue
                if allocation == "sensitivity" and method != "asvd":
                    continue
                for lora in (False, True):
                    configs.append({"method": method, "allocation": allocation, "ratio": ratio, "lora_update": lora})
            if allocation == "uniform":
                for structure in ("monarch", "btt", "modegpt"):  # modegpt: its own widths, no lora_update
                    configs.append({"method": structure, "allocation": "uniform", "ratio": ratio,
                                    "lora_update": False})
    return configs


def clocked(run: Callable[[], object]) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of ``run()``: ``time.perf_counter`` and the process CPU time
    (every thread's, so torch's intra-op threads count; another process's load does not)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def clocked_compress(base: torch.nn.Module, **kwargs) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of ``sk.compress`` on a fresh copy of ``base`` (copied outside the clock)."""
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        return clocked(lambda: sk.compress(model, **kwargs))


def _best(runs: list[tuple[float, float]]) -> dict[str, float]:
    return {"wall": min(r[0] for r in runs), "cpu": min(r[1] for r in runs)}


def floor_timing(base: torch.nn.Module, calib: list[torch.Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """Each method at ratio 0.3 (uniform) against its floor, interleaved round by round: plain svd's
    time plus the plain forward over the calibration batches (plus one backward for fwsvd/gfwsvd).

    Wall and process CPU seconds, the best of ``repeats`` rounds each; the ratios on both clocks,
    and the 1-minute load average before each round."""
    from spectrakit.adapt.train import lm_loss

    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in FLOOR_METHODS}
    runs.update({"forward": [], "forward+backward": []})
    loads = []

    def forward() -> None:
        with torch.no_grad():
            for batch in calib:
                base(batch)

    def forward_backward(model: torch.nn.Module) -> None:
        for batch in calib:  # the loss the Fisher methods differentiate, one backward per batch
            lm_loss(model, torch.cat([batch, batch[:, -1:]], dim=1)).backward()

    for round_ in range(repeats):
        loads.append(os.getloadavg()[0])
        for method in FLOOR_METHODS:
            runs[method].append(clocked_compress(base, method=method, ratio=0.3, calibration=calib,
                                                 allocation="uniform"))
        runs["forward"].append(clocked(forward))
        runs["forward+backward"].append(clocked(functools.partial(forward_backward, copy.deepcopy(base))))
        print(f"round {round_ + 1}/{repeats} (load {loads[-1]:.1f}): "
              + ", ".join(f"{m} {runs[m][-1][1]:.2f}" for m in runs) + " cpu s", flush=True)
    best = {label: _best(times) for label, times in runs.items()}
    timing: dict[str, dict[str, float]] = {}
    for method in FLOOR_METHODS:
        part = "forward+backward" if method in FISHER else "forward"
        row = {}
        for clock in ("wall", "cpu"):
            floor = best["svd"][clock] + best[part][clock]
            row.update({f"{clock}_seconds": best[method][clock], f"{clock}_floor_seconds": floor,
                        f"{clock}_vs_floor": best[method][clock] / floor,
                        f"{clock}_vs_svd": best[method][clock] / best["svd"][clock]})
        timing[method] = row
    timing["floor"] = {f"{label} {clock}": best[label][clock] for label in ("svd", "forward", "forward+backward")
                       for clock in ("wall", "cpu")}
    timing["load"] = {"min": min(loads), "max": max(loads), "rounds": repeats}
    return timing


def floor_table(timing: dict[str, dict[str, float]]) -> str:
    """:func:`floor_timing`'s result as a markdown table (both clocks)."""
    return markdown_table(
        ["method", "wall s", "wall floor", "× floor (wall)", "cpu s", "cpu floor", "× floor (cpu)", "× svd (cpu)"],
        [[m, f"{t['wall_seconds']:.3f}", f"{t['wall_floor_seconds']:.3f}", f"{t['wall_vs_floor']:.2f}",
          f"{t['cpu_seconds']:.3f}", f"{t['cpu_floor_seconds']:.3f}", f"{t['cpu_vs_floor']:.2f}",
          f"{t['cpu_vs_svd']:.2f}"] for m, t in timing.items() if m not in ("floor", "load")])


def llama_1b_block() -> torch.nn.Module:
    """One whole decoder block of Llama-3.2-1B's shape (q, k, v, o, gate, up, down: hidden 2048,
    MLP 8192, 32 heads, 8 key-value heads), random weights, a 256-token vocabulary."""
    model = llama_1b_layer()
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 8192
    return model


def bound_timing(repeats: int) -> dict[str, dict[str, float]]:
    """svd and svd-llm at ratio 0.3 with 16 × 256 calibration tokens on one Llama-3.2-1B-shaped
    decoder block (all seven of its linear layers) and on GPT-2 small (its 48 linear layers),
    alternating round by round, with the plain forward over the calibration batches for
    reference; the best of each (wall and process CPU) and svd-llm's ratio to svd on both."""
    calib = calibration(16)
    timing: dict[str, dict[str, float]] = {}
    for label, build in (("llama-3.2-1b block", llama_1b_block), ("gpt2-small", gpt2_small)):
        base = build()
        runs: dict[str, list[tuple[float, float]]] = {"svd": [], "svd-llm": [], "forward": []}
        loads = []

        def forward(model: torch.nn.Module = base) -> None:
            with torch.no_grad():
                for batch in calib:
                    model(batch)

        for _ in range(repeats):
            loads.append(os.getloadavg()[0])
            for method in ("svd", "svd-llm"):
                runs[method].append(clocked_compress(base, method=method, ratio=0.3, calibration=calib))
            runs["forward"].append(clocked(forward))
            print(f"{label} (load {loads[-1]:.1f}): " + ", ".join(f"{m} {runs[m][-1][0]:.2f} s wall "
                                                               f"{runs[m][-1][1]:.2f} s cpu" for m in runs),
                  flush=True)
        best = {method: _best(times) for method, times in runs.items()}
        targets = sum(1 for m in base.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
        timing[label] = {**{f"{m} {clock}": best[m][clock] for m in runs for clock in ("wall", "cpu")},
                         "svd-llm vs svd (wall)": best["svd-llm"]["wall"] / best["svd"]["wall"],
                         "svd-llm vs svd (cpu)": best["svd-llm"]["cpu"] / best["svd"]["cpu"],
                         "linear layers (with the output head, which is not a target)": targets,
                         "load min": min(loads), "load max": max(loads)}
        print(f"{label}: {timing[label]}", flush=True)
    return timing


def second_half(args: argparse.Namespace, ratios: list[float]) -> None:
    """``--second-half``: the configurations of :func:`second_half_configs` and :func:`floor_timing`."""
    base = sk.reference_model()
    calib = calibration(args.calib)
    windows = {"code": data.eval_windows(data.code_corpus("validation"), SEQ_LEN, args.windows),
               "docs": data.eval_windows(data.docs_corpus("validation"), SEQ_LEN, args.windows)}
    dense = {corpus: bits_per_byte(base, w) for corpus, w in windows.items()}
    print(f"machine: {machine()}\ndense: code {dense['code']:.4f}, docs {dense['docs']:.4f}", flush=True)
    from spectrakit._atomic import atomic_write

    def save(extra: dict) -> None:
        with atomic_write(args.json) as handle:
            json.dump({"machine": machine(), "command": " ".join(["python", *sys.argv]), "dense": dense,
                       "calibration_sequences": args.calib, "eval_windows": args.windows, "lora_lr": args.lora_lr,
                       "lora_epochs": args.lora_epochs, **extra}, handle, indent=1)

    results: list[dict] = []
    only = set(args.only.split(",")) if args.only else None
    for config in second_half_configs(ratios):
        if only is not None and config["method"] not in only:
            continue
        if args.allocations and config["allocation"] not in args.allocations.split(","):
            continue
        extra = {"lora_lr": args.lora_lr, "lora_epochs": args.lora_epochs} if config["lora_update"] else {}
        if config["allocation"] == "sensitivity":
            extra["search_batches"] = 1
        kwargs = {k: v for k, v in config.items() if k != "lora_update" or v}
        model, report, seconds, notes = timed_compress(base, calibration=calib, **kwargs, **extra)
        row = {**config, "achieved_ratio": report.ratio, "parameters_after": report.parameters_after,
               "seconds": seconds, "lora_seconds": report.lora_seconds,
               **{f"bpb_{c}": bits_per_byte(model, w) for c, w in windows.items()},
               "lora_loss_before": report.lora_loss_before, "lora_loss_after": report.lora_loss_after,
               "ranks": report.ranks, "warnings": notes}
        results.append(row)
        print(f"{config['ratio']:.0%} {config['method']:10s} {config['allocation']:13s} "
              f"{'lora' if config['lora_update'] else '    '} code {row['bpb_code']:.4f} docs {row['bpb_docs']:.4f} "
              f"removed {report.ratio:.3f} ({seconds:.2f} s)", flush=True)
        save({"partial": True, "results": results})  # a run cut short keeps what it measured
    timing = floor_timing(base, calib, args.repeats) if args.repeats else {}
    if timing:
        print("\n### time at ratio 0.3 against the floor\n")
        print(floor_table(timing))
    bound = bound_timing(args.llama1b_repeats) if args.llama1b_repeats else {}
    save({"results": results, "timing_vs_floor": timing, "timing_bound": bound})
    plot_second_half(results, dense, Path(args.plot))
    print(f"\nwrote {args.json} and {args.plot}")


LORA_GRID = ((1e-3, 1), (3e-4, 1), (1e-4, 1), (1e-4, 2), (3e-5, 1), (3e-5, 2))
LORA_METHODS = ("svd", "asvd", "fwsvd", "gfwsvd", "svd-llm", "svd-llm-v2")


def lora_study(args: argparse.Namespace, ratios: list[float]) -> None:
    """``--lora-study``: held-out bits/byte with ``lora_update`` at each (lr, passes per side) of
    :data:`LORA_GRID` against the same method without it (uniform allocation), to pick the default."""
    base = sk.reference_model()
    calib = calibration(args.calib)
    windows = {"code": data.eval_windows(data.code_corpus("validation"), SEQ_LEN, args.windows),
               "docs": data.eval_windows(data.docs_corpus("validation"), SEQ_LEN, args.windows)}
    dense = {corpus: bits_per_byte(base, w) for corpus, w in windows.items()}
    print(f"machine: {machine()}\ndense: code {dense['code']:.4f}, docs {dense['docs']:.4f}", flush=True)
    from spectrakit._atomic import atomic_write

    results: list[dict] = []
    only = set(args.only.split(",")) if args.only else None
    commands, machines = [" ".join(["python", *sys.argv])], [machine()]
    if only is not None and Path(args.json).exists():  # --only adds to (replaces its methods in) an earlier study
        earlier = json.loads(Path(args.json).read_text())
        if (earlier.get("eval_windows"), earlier.get("calibration_sequences")) == (args.windows, args.calib):
            results = [r for r in earlier["results"] if r["method"] not in only]
            commands = [*earlier.get("commands", [earlier.get("command")]), *commands]
            machines = [*earlier.get("machines", [earlier.get("machine")]), *machines]
    for ratio in ratios:
        for method in LORA_METHODS:
            if only is not None and method not in only:
                continue
            for lr, epochs in ((None, None), *LORA_GRID):
                extra = {} if lr is None else {"lora_update": True, "lora_lr": lr, "lora_epochs": epochs}
                model, report, seconds, _ = timed_compress(base, method=method, ratio=ratio, allocation="uniform",
                                                           calibration=calib, **extra)
                row = {"method": method, "ratio": ratio, "lora_lr": lr, "lora_epochs": epochs, "seconds": seconds,
                       "lora_loss_before": report.lora_loss_before, "lora_loss_after": report.lora_loss_after,
                       **{f"bpb_{c}": bits_per_byte(model, w) for c, w in windows.items()}}
                results.append(row)
                print(f"{ratio:.0%} {method:10s} lr {lr} passes {epochs}: code {row['bpb_code']:.4f} "
                      f"docs {row['bpb_docs']:.4f} calib loss {report.lora_loss_before} -> {report.lora_loss_after}",
                      flush=True)
                with atomic_write(args.json) as handle:
                    json.dump({"machines": machines, "commands": commands, "dense": dense,
                               "calibration_sequences": args.calib, "eval_windows": args.windows,
                               "results": results}, handle, indent=1)
    print(f"\nwrote {args.json}")


def plot_second_half(results: list[dict], dense: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
    colors = dict(zip((*ALL_METHODS, "monarch", "btt", "modegpt"),
                      ("tab:gray", "tab:orange", "tab:green", "tab:olive", "tab:blue", "tab:purple", "tab:red",
                       "tab:brown", "tab:cyan")))
    for ax, lora in zip(axes, (False, True)):
        for method, color in colors.items():
            for allocation, style in (("uniform", "--"), ("global", "-"), ("heterogeneous", ":"),
                                      ("sensitivity", "-.")):
                rows = [r for r in results if r["method"] == method and r["allocation"] == allocation
                        and r["lora_update"] == lora]
                if rows:
                    ax.plot([100 * r["ratio"] for r in rows], [r["bpb_code"] - dense["code"] for r in rows], style,
                            marker="o", markersize=3, color=color, label=f"{method} {allocation}")
        ax.set_title(f"held-out code, {'with' if lora else 'without'} lora_update (dense {dense['code']:.4f})")
        ax.set_xlabel("targeted weights removed (%)")
        ax.set_ylabel("bits/byte above the dense model")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2, loc="upper left")
    fig.suptitle("spectrakit.compress, second half, on the reference model")
    save_figure(fig, path, dpi=120)


def plot(results: list[dict], dense: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = dict(zip(METHODS, ("tab:gray", "tab:orange", "tab:green", "tab:blue")))
    for ax, corpus in zip(axes, ("code", "docs")):
        for method in METHODS:
            for allocation, style in zip(ALLOCATIONS, ("--", "-")):
                rows = [r for r in results if r["method"] == method and r["allocation"] == allocation]
                ax.plot([100 * r["ratio"] for r in rows], [r[f"bpb_{corpus}"] - dense[corpus] for r in rows], style,
                        marker="o", markersize=3, color=colors[method], label=f"{method} {allocation}")
        ax.set_title(f"held-out {corpus}: dense model {dense[corpus]:.4f} bits/byte")
        ax.set_xlabel("targeted weights removed (%)")
        ax.set_ylabel("bits/byte above the dense model (lower is better)")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle("spectrakit.compress on the reference model (byte-level Llama, 3.0 M parameters)")
    save_figure(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 256 bytes (default 16)")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows per corpus (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="docs/benchmarks/compress.json")
    parser.add_argument("--plot", default="docs/img/compress_bpb.png")
    parser.add_argument("--gpt2-repeats", type=int, default=1,
                        help="rounds of the GPT-2-size timing (about 70 s each; 0 skips it)")
    parser.add_argument("--llama1b-repeats", type=int, default=1,
                        help="rounds of the timing on one Llama-3.2-1B-shaped decoder block (about 45 s each; 0 skips "
                             "it; with --second-half: rounds of the --bound-only timing)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak memory growth of each method on GPT-2 small (fresh process each)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the time of each method at ratio 0.3 (interleaved rounds); writes no JSON or plot")
    parser.add_argument("--second-half", action="store_true",
                        help="every method with and without lora_update, the new allocations, Monarch/BTT and the "
                             "time against each method's floor (writes --json, default compress_second.json)")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="lora_update's learning rate (--second-half)")
    parser.add_argument("--floor-only", action="store_true",
                        help="only each method's time at ratio 0.3 against its floor (printed as JSON)")
    parser.add_argument("--lora-epochs", type=int, default=2, help="lora_update's passes per side (--second-half)")
    parser.add_argument("--bound-only", action="store_true",
                        help="only svd-llm's time against plain svd on one Llama-3.2-1B-shaped decoder block and "
                             "on GPT-2 small, --repeats interleaved rounds (printed as JSON)")
    parser.add_argument("--allocations", help="--second-half: only these allocations (comma-separated)")
    parser.add_argument("--only", help="--second-half, --lora-study: only these methods (comma-separated)")
    parser.add_argument("--lora-study", action="store_true",
                        help="held-out bits/byte with lora_update over a grid of learning rates and passes "
                             "(writes --json, default compress_lora.json)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 makes the CPU clock "
                                                    "robust to other processes' load (no spinning worker threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.bound_only:
        print(f"machine: {machine()}")
        print(json.dumps(bound_timing(max(args.repeats, 1)), indent=1))
        return
    if args.floor_only:  # just the time of every method against its floor, printed
        print(f"machine: {machine()}")
        timing = floor_timing(sk.reference_model(), calibration(args.calib), max(args.repeats, 1))
        print(json.dumps(timing, indent=1))
        print(floor_table(timing))
        return
    if args.lora_study:
        if args.json == "docs/benchmarks/compress.json":
            args.json = "docs/benchmarks/compress_lora.json"
        lora_study(args, ratios)
        return
    if args.second_half:
        if args.json == "docs/benchmarks/compress.json":
            args.json = "docs/benchmarks/compress_second.json"
        if args.plot == "docs/img/compress_bpb.png":
            args.plot = "docs/img/compress_second_bpb.png"
        second_half(args, ratios)
        return

    if args.memory_only:
        print(f"machine: {machine()}\n")
        print(markdown_table(["method", "peak RSS growth, MB"],
                             [[m, f"{mb:.0f}"] for m, mb in memory_growth().items()]))
        return
    base = sk.reference_model()
    calib = calibration(args.calib)
    if args.timing_only:
        print(f"machine: {machine()}\n")
        print(markdown_table(["method", "best s", "of which calibration", "× plain svd"], interleaved_timing(
            base, calib, args.repeats)))
        return
    windows = {"code": data.eval_windows(data.code_corpus("validation"), SEQ_LEN, args.windows),
               "docs": data.eval_windows(data.docs_corpus("validation"), SEQ_LEN, args.windows)}
    dense = {corpus: bits_per_byte(base, w) for corpus, w in windows.items()}
    print(f"machine: {machine()}")
    print(f"dense: {sum(p.numel() for p in base.parameters()):,} parameters; bits/byte code {dense['code']:.4f}, "
          f"docs {dense['docs']:.4f}; calibration {args.calib}×{SEQ_LEN} bytes", flush=True)

    results = []
    for ratio in ratios:
        for method in METHODS:
            for allocation in ALLOCATIONS:
                model, report, seconds, notes = timed_compress(base, method=method, ratio=ratio,
                                                               allocation=allocation, calibration=calib)
                row = {"method": method, "allocation": allocation, "ratio": ratio, "achieved_ratio": report.ratio,
                       "parameters_after": report.parameters_after, "seconds": seconds,
                       "calibration_seconds": report.calibration_seconds,
                       **{f"bpb_{c}": bits_per_byte(model, w) for c, w in windows.items()},
                       "ranks": report.ranks, "warnings": notes}
                results.append(row)
                print(f"{ratio:.0%} {method:8s} {allocation:7s} code {row['bpb_code']:.4f} docs {row['bpb_docs']:.4f} "
                      f"({seconds:.2f} s){' [damped]' if notes else ''}", flush=True)

    # timing: each method at 0.3, best of --repeats, fresh copies outside the clock
    timing = {}
    for method in METHODS:
        runs = [timed_compress(base, method=method, ratio=0.3, calibration=calib) for _ in range(args.repeats)]
        best = min(runs, key=lambda run: run[2])
        timing[method] = {"seconds": best[2], "calibration_seconds": best[1].calibration_seconds}
    for method in METHODS:
        timing[method]["vs_svd"] = timing[method]["seconds"] / timing["svd"]["seconds"]
    scaling = {}
    for sequences in (4, 8, 16, 32):
        runs = [timed_compress(base, method="svd-llm", ratio=0.3, calibration=calibration(sequences))
                for _ in range(args.repeats)]
        best = min(runs, key=lambda run: run[2])
        scaling[sequences] = {"tokens": sequences * SEQ_LEN, "seconds": best[2],
                              "calibration_seconds": best[1].calibration_seconds,
                              "vs_svd": best[2] / timing["svd"]["seconds"], "damped": bool(best[3])}

    wide = model_timing(wide_llama(), args.repeats)
    gpt2 = model_timing(gpt2_small(), args.gpt2_repeats) if args.gpt2_repeats else {}
    llama_1b = model_timing(llama_1b_layer(), args.llama1b_repeats) if args.llama1b_repeats else {}

    print("\n### Held-out bits per byte (lower is better)\n")
    for corpus in ("code", "docs"):
        header = ["ratio", *[f"{m} {a[0]}" for m in METHODS for a in ALLOCATIONS], "best"]
        rows = []
        for ratio in ratios:
            cells = {(r["method"], r["allocation"]): r[f"bpb_{corpus}"] for r in results if r["ratio"] == ratio}
            best = min(cells, key=cells.get)
            rows.append([f"{ratio:.0%}", *[f"{cells[(m, a)]:.4f}" for m in METHODS for a in ALLOCATIONS],
                         f"{best[0]} {best[1]}"])
        print(f"**{corpus}** (dense {dense[corpus]:.4f}; u = uniform, g = global)\n")
        print(markdown_table(header, rows) + "\n")
    print(f"### compress() wall time at ratio 0.3 (best of {args.repeats})\n")
    print(markdown_table(["method", "seconds", "of which calibration", "× plain svd"],
                         [[m, f"{t['seconds']:.2f}", f"{t['calibration_seconds']:.2f}", f"{t['vs_svd']:.2f}"]
                          for m, t in timing.items()]) + "\n")
    print("### svd-llm time vs calibration size\n")
    print(markdown_table(["calibration tokens", "seconds", "of which calibration", "× plain svd", "damped"],
                         [[s["tokens"], f"{s['seconds']:.2f}", f"{s['calibration_seconds']:.2f}",
                           f"{s['vs_svd']:.2f}", s["damped"]] for s in scaling.values()]))

    print("\n### Wider model (random Llama, hidden 768, MLP 2048, 2 layers; 4096 calibration tokens)\n")
    print(markdown_table(["method", "seconds", "of which calibration", "× plain svd"],
                         [[m, f"{t['seconds']:.2f}", f"{t['calibration_seconds']:.2f}", f"{t['vs_svd']:.2f}"]
                          for m, t in wide.items()]))
    if gpt2:
        print(f"\n### GPT-2 small (124 M, random weights; 4096 calibration tokens; best of {args.gpt2_repeats})\n")
        print(markdown_table(["method", "seconds", "of which calibration", "× plain svd"],
                             [[m, f"{t['seconds']:.2f}", f"{t['calibration_seconds']:.2f}", f"{t['vs_svd']:.2f}"]
                              for m, t in gpt2.items()]))
    if llama_1b:
        print(f"\n### One Llama-3.2-1B-shaped layer (random weights; 4096 calibration tokens; "
              f"best of {args.llama1b_repeats})\n")
        print(markdown_table(["method", "seconds", "of which calibration", "× plain svd"],
                             [[m, f"{t['seconds']:.2f}", f"{t['calibration_seconds']:.2f}", f"{t['vs_svd']:.2f}"]
                              for m, t in llama_1b.items()]))

    plot(results, dense, Path(args.plot))
    from spectrakit._atomic import atomic_write

    with atomic_write(args.json) as handle:
        json.dump({"machine": machine(), "command": " ".join(["python", *sys.argv]), "dense": dense,
                   "calibration_sequences": args.calib, "eval_windows": args.windows, "results": results,
                   "timing": timing, "timing_vs_calibration": scaling, "timing_wide_model": wide,
                   "timing_gpt2": gpt2, "timing_llama_1b_layer": llama_1b}, handle, indent=1)
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
