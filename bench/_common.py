"""Shared helpers for the benchmarks: timing, machine description, markdown output."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def best_of(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """(best, median) wall-clock seconds of ``repeats`` calls, after garbage collection."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and close it."""
    from spectrakit._atomic import atomic_save_path

    fig.tight_layout()
    with atomic_save_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
