"""Sharing the matrices of one analysis among local processes or distributed ranks.

Matrices are dealt out by size (largest first, each to the least-loaded share), so
shares finish at about the same time. Local workers are *spawned* (GNU OpenMP is
not fork-safe): for a file or folder each worker opens the source itself and
streams its own tensors; an in-memory model's matrices travel through shared
memory. Under ``torch.distributed`` every rank analyzes its share
(:func:`spectrakit._distributed.partition`) and ``all_gather_object`` gives each rank the
full result.

Results do not depend on ``threads`` or ``workers``: LAPACK's eigensolvers (and large
products) round differently with different intra-op thread counts, so each matrix is
computed with a thread count fixed by its size alone — one thread for small matrices
(≤ 1024 × 4096, where the eigensolver keeps about one core busy anyway), and the caller's
``torch.get_num_threads()`` for large ones, which always run one at a time in the calling
process, before any threads or workers take the small ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._distributed import agree, distributed_group, partition
from .._memory import release_freed_memory
from .._progress import progress as progress_bar
from ..weights import MatrixRecord, iter_matrices
from .run import AnalyzeOptions, MatrixResult, analyze_record, matrix_metrics, skip_reason_before_load


def _cost(record: MatrixRecord) -> int:
    rows, cols = record.matrix_shape
    return rows * cols * min(rows, cols)


def _threads_for(record: MatrixRecord, large_threads: int) -> int:
    """The intra-op threads ``record`` is computed with, whatever the parallel setting."""
    return 1 if _cost(record) <= _SMALL_COST else large_threads


_IN_MEMORY = ("module", "state_dict")  # record sources whose tensors are not loaded per record


def _serial(records: Sequence[MatrixRecord], options: AnalyzeOptions, progress: bool,
            desc: str = "spectra", large_threads: int | None = None) -> dict[str, MatrixResult]:
    before = torch.get_num_threads()
    large_threads = before if large_threads is None else large_threads
    results = {}
    try:
        for record in progress_bar(records, total=len(records), desc=desc, enabled=progress):
            wanted = _threads_for(record, large_threads)
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
            results[record.name] = analyze_record(record, options)
            if record.source not in _IN_MEMORY:
                release_freed_memory()  # streamed: else the heap grows around each freed tensor (_memory)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
    return results


# --- threads in this process ----------------------------------------------------------------

def _threaded(records: Sequence[MatrixRecord], options: AnalyzeOptions, threads: int,
              progress: bool) -> dict[str, MatrixResult]:
    """Several matrices at a time in this process, sharing the intra-op threads.

    LAPACK's symmetric eigensolver keeps about one core busy on matrices of a few hundred
    rows, so a model of small matrices leaves the other cores idle in :func:`_serial`. Large
    matrices keep the whole machine to themselves (their products and eigensolves use every
    core already) and run first, one at a time, so at most ``threads`` small ones are held
    at once. The small ones run with one intra-op thread each, as in :func:`_serial`, so the
    results are those of a serial run; torch's thread setting is process-wide while the pool
    runs (a worker thread cannot set it for itself alone) and is put back afterwards.
    """
    from concurrent.futures import ThreadPoolExecutor

    large = [r for r in records if _cost(r) > _SMALL_COST]
    small = sorted((r for r in records if _cost(r) <= _SMALL_COST), key=_cost, reverse=True)
    results = _serial(large, options, progress, desc="spectra (large)") if large else {}
    if not small:
        return results
    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            done = pool.map(analyze_record, small, [options] * len(small))
            for result in progress_bar(done, total=len(small), desc="spectra", enabled=progress):
                results[result.name] = result
    finally:
        torch.set_num_threads(before)
    return results


# rows · cols · min(rows, cols) up to a 1024 × 4096 matrix: eigensolves of ≤ 1024 rows
_SMALL_COST = 1024 * 4096 * 1024


def default_threads(records: Sequence[MatrixRecord]) -> int:
    """Threads for ``analyze(threads=None)``: one per intra-op thread torch may use (at most 4)
    for matrices already in this process's CPU memory; 1 for files, which stream one tensor at
    a time, and for accelerators. (``torch.set_num_threads(1)`` before the call keeps it serial.)"""
    cores = min(4, torch.get_num_threads())
    if cores < 2 or len(records) < 2 or any(r.source not in _IN_MEMORY for r in records):
        return 1
    loadable = [r for r in records if skip_reason_before_load(r) is None]
    return cores if loadable and all(r.load().device.type == "cpu" for r in loadable) else 1


# --- local worker processes ------------------------------------------------------------------

_WORKER_RECORDS: dict[str, MatrixRecord] = {}
# name → (matrix, conv kernel or None), shared with the workers when the source is in memory
_WORKER_MATRICES: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
_WORKER_OPTIONS = AnalyzeOptions()


def _init_worker(source: Any, include: Any, exclude: Any,
                 matrices: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None,
                 options: AnalyzeOptions, threads: int) -> None:
    global _WORKER_RECORDS, _WORKER_MATRICES, _WORKER_OPTIONS
    torch.set_num_threads(threads)
    _WORKER_OPTIONS = options
    if matrices is not None:
        _WORKER_MATRICES = matrices
    else:
        _WORKER_RECORDS = {r.name: r for r in iter_matrices(source, include=include, exclude=exclude)}


def _work(name: str) -> MatrixResult:
    if name in _WORKER_MATRICES:
        matrix, kernel = _WORKER_MATRICES[name]
        return MatrixResult(name, *matrix_metrics(matrix, _WORKER_OPTIONS, kernel))
    result = analyze_record(_WORKER_RECORDS[name], _WORKER_OPTIONS)
    release_freed_memory()
    return result


def _pool(source: Any, records: Sequence[MatrixRecord], options: AnalyzeOptions, include: Any, exclude: Any,
          workers: int, progress: bool) -> dict[str, MatrixResult]:
    import torch.multiprocessing as mp

    in_memory = not (isinstance(source, str) or hasattr(source, "__fspath__"))
    # large matrices here, one at a time with every thread (as in a serial run); workers take the rest
    large = [r for r in records if _cost(r) > _SMALL_COST]
    results: dict[str, MatrixResult] = _serial(large, options, progress, desc="spectra (large)") if large else {}
    records = [r for r in records if _cost(r) <= _SMALL_COST]
    if not records:
        return results
    matrices = None
    todo = list(records)
    if in_memory:
        matrices = {}
        for record in records:
            if skip_reason_before_load(record) is None:
                kernel = record.load().contiguous().share_memory_() if options.wants_kernel(record.kind) else None
                matrices[record.name] = (record.matrix().contiguous().share_memory_(), kernel)
        # records that cannot be loaded are answered here, without a worker
        todo = [r for r in records if r.name in matrices]
        for record in records:
            if record.name not in matrices:
                results[record.name] = analyze_record(record, options)
    names = [r.name for r in sorted(todo, key=_cost, reverse=True)]  # big ones first: less idle at the end
    context = mp.get_context("spawn")
    # one intra-op thread per worker, as every small matrix gets in a serial run
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(None if in_memory else str(source), include, exclude, matrices, options,
                                1)) as pool:
        for result in progress_bar(pool.imap_unordered(_work, names), total=len(names), desc="spectra",
                                   enabled=progress):
            results[result.name] = result
    return results


# --- torch.distributed -----------------------------------------------------------------------

def _gathered(records: Sequence[MatrixRecord], options: AnalyzeOptions, rank: int, world: int,
              progress: bool) -> dict[str, MatrixResult]:
    import torch.distributed as dist

    share = partition([_cost(r) for r in records], world)[rank]
    mine = agree(lambda: _serial([records[i] for i in share], options, progress and rank == 0,
                                 desc=f"spectra (rank {rank})"), "analyze")
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    results: dict[str, MatrixResult] = {}
    for part in everyone:
        results.update(part)
    return results


def run_records(source: Any, records: Sequence[MatrixRecord], options: AnalyzeOptions, *, include: Any = None,
                exclude: Any = None, workers: int = 1, threads: int | None = None, distributed: bool | None = None,
                progress: bool = True) -> dict[str, MatrixResult]:
    """Results for every record, computed serially, by threads, by local workers or across ranks."""
    group = distributed_group(distributed)
    if group is not None:
        return _gathered(records, options, *group, progress)
    if workers > 1 and len(records) > 1:
        return _pool(source, records, options, include, exclude, workers, progress)
    threads = default_threads(records) if threads is None else threads
    if threads > 1 and len(records) > 1:
        return _threaded(records, options, threads, progress)
    return _serial(records, options, progress)
