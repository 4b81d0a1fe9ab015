"""``iter_matrices``: one entry point for every place matrices come from.

Example::

    >>> import torch
    >>> from spectrakit.weights import iter_matrices
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> [(r.name, r.shape) for r in iter_matrices(model, exclude="2.")]
    [('0.weight', (16, 8))]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from torch import nn

from spectrakit.errors import SpectrakitError
from spectrakit.weights.files import path_records, state_dict_records
from spectrakit.weights.module import iter_module_matrices
from spectrakit.weights.record import KINDS, MatrixRecord, matches_any
from spectrakit.weights.recurrent import split_gates

Patterns = str | Sequence[str] | None


def iter_matrices(
    source: nn.Module | str | os.PathLike[str] | Mapping[str, object],
    include: Patterns = None,
    exclude: Patterns = None,
    kinds: str | Iterable[str] | None = None,
    *,
    transposed: Sequence[str] | None = None,
    gates: bool = True,
) -> Iterator[MatrixRecord]:
    """Yield a :class:`MatrixRecord` for each weight matrix of ``source``.

    Nothing is loaded: call ``record.load()`` or ``record.matrix()`` for the
    values, one record at a time, to keep a single tensor in memory.

    Args:
        source: an ``nn.Module`` (records in parameter order); a path to a
            ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file or a Hugging
            Face folder (records in natural name order, ``layers.9`` before
            ``layers.10``); or a state dict (records in its order).
        include: keep only records whose name or an alias matches one of these
            patterns. A pattern with ``*?[`` is an ``fnmatch`` pattern over
            the full name; one without matches as a substring.
        exclude: drop records whose name or an alias matches one of these.
        kinds: keep only these kinds (see :data:`~spectrakit.weights.record.KINDS`).
        transposed: files and state dicts only — name patterns of 2-D weights
            stored ``(in, out)``; by default GPT-2 style ``Conv1D`` weights are
            detected (see :mod:`spectrakit.weights.files`).
        gates: report each LSTM/GRU weight as one ``recurrent`` record per gate
            (``lstm.weight_ih_l0.forget_gate``, an exact row slice; see
            :mod:`spectrakit.weights.recurrent`); ``False`` keeps the stacked
            parameters as stored, for callers that need real parameter names.

    Raises:
        SpectrakitError: a missing path, unreadable file or unknown kind, at
            call time rather than at the first ``next()``.

    Example::

        >>> import torch
        >>> model = torch.nn.Conv1d(2, 4, 3)
        >>> [r.kind for r in iter_matrices(model, kinds="conv1d")]
        ['conv1d']
    """
    wanted_kinds = _check_kinds(kinds)
    include_patterns = _as_patterns(include)
    exclude_patterns = _as_patterns(exclude)
    # Resolved now so that a bad source fails where iter_matrices is called.
    records = _records_of(source, transposed)
    if gates:
        records = split_gates(records)
    return _filtered(records, include_patterns, exclude_patterns, wanted_kinds)


def _records_of(source: object, transposed: Sequence[str] | None) -> Iterable[MatrixRecord]:
    if isinstance(source, nn.Module):
        if transposed is not None:
            raise SpectrakitError(
                "transposed= applies to files and state dicts; a module's layers "
                "already say their layout"
            )
        return iter_module_matrices(source)
    if isinstance(source, (str, os.PathLike)):
        return path_records(source, transposed=transposed)
    if isinstance(source, Mapping):
        return state_dict_records(source, transposed=transposed)
    raise SpectrakitError(
        f"cannot read weight matrices from a {type(source).__name__}; "
        "pass an nn.Module, a path or a state dict"
    )


def _filtered(
    records: Iterable[MatrixRecord],
    include: list[str] | None,
    exclude: list[str] | None,
    kinds: frozenset[str] | None,
) -> Iterator[MatrixRecord]:
    for record in records:
        names = (record.name, *record.aliases)
        if kinds is not None and record.kind not in kinds:
            continue
        if include is not None and not matches_any(names, include):
            continue
        if exclude and matches_any(names, exclude):
            continue
        yield record


def _as_patterns(patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _check_kinds(kinds: str | Iterable[str] | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    wanted = frozenset([kinds] if isinstance(kinds, str) else kinds)
    unknown = sorted(wanted - set(KINDS))
    if unknown:
        raise SpectrakitError(
            f"unknown matrix kind {unknown[0]!r}; expected one of {', '.join(KINDS)}"
        )
    return wanted
