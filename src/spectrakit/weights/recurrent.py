"""Recurrent weights (LSTM, GRU, RNN) as one matrix per gate.

PyTorch stacks the gates of a recurrent layer along the rows of one parameter:

===========  ==============================================  ===========================
layer        ``weight_ih_l{k}`` / ``weight_hh_l{k}`` rows      gates, top to bottom
===========  ==============================================  ===========================
``LSTM``     ``4·hidden``                                    input, forget, cell, output
``GRU``      ``3·hidden``                                    reset, update, new
``RNN``      ``hidden``                                      (one matrix, not split)
===========  ==============================================  ===========================

Each gate is its own linear map with its own spectrum, so a record per gate is what
a spectral analysis wants:

    W_ih = [W_i; W_f; W_g; W_o],   W_x = W_ih[x·h : (x + 1)·h],   x = 0 … G − 1.

The gate count ``G`` comes from the names and shapes alone, so a module and its
saved file give the same records: ``weight_hh`` is ``(G·h, h)``, or ``(G·h, p)`` with
a projection ``weight_hr`` of shape ``(p, h)``. The same rule covers ``LSTMCell``
/ ``GRUCell`` / ``RNNCell`` (``weight_ih`` / ``weight_hh``, no layer suffix) and
bidirectional layers (``_reverse``). A gate's record is named
``<parameter>.<gate>_gate`` (``lstm.weight_ih_l0.forget_gate``), has kind
``recurrent``, and loads an exact row slice of the stored tensor. A plain RNN's
weights, and LSTM projections (``weight_hr``), keep their names with kind
``recurrent``.

Example::

    >>> import torch
    >>> from spectrakit.weights import iter_matrices
    >>> lstm = torch.nn.LSTM(input_size=3, hidden_size=5)
    >>> [(r.name, r.shape) for r in iter_matrices(lstm)][:2]
    [('weight_ih_l0.input_gate', (5, 3)), ('weight_ih_l0.forget_gate', (5, 3))]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator

import torch

from spectrakit.weights.record import MatrixRecord

#: Gate names in PyTorch's storage order, by gate count.
GATES: dict[int, tuple[str, ...]] = {
    4: ("input", "forget", "cell", "output"),  # LSTM: W_ii | W_if | W_ig | W_io
    3: ("reset", "update", "new"),  # GRU: W_ir | W_iz | W_in
}

# prefix, which weight (ih / hh / hr), and the layer suffix ("_l0", "_l1_reverse" or "")
_RECURRENT = re.compile(r"^(?P<prefix>(?:.*\.)?)weight_(?P<which>ih|hh|hr)(?P<suffix>(?:_l\d+)?(?:_reverse)?)$")


def gate_count(name: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """How many gates the 2-D recurrent weight ``name`` stacks, or None if it is not one.

    Args:
        name: a parameter name, e.g. ``"encoder.lstm.weight_ih_l1_reverse"``.
        shapes: the shapes of every parameter of the source, by name (its sibling
            ``weight_hh`` / ``weight_hr`` tell the hidden size).

    Example::

        >>> gate_count("gru.weight_ih_l0", {"gru.weight_ih_l0": (24, 4), "gru.weight_hh_l0": (24, 8)})
        3
    """
    match = _RECURRENT.match(name)
    if match is None or len(shapes.get(name, ())) != 2:
        return None
    prefix, which, suffix = match["prefix"], match["which"], match["suffix"]
    if which == "hr":
        return 1  # an LSTM projection: one matrix, no gates
    hidden_to_hidden = shapes.get(f"{prefix}weight_hh{suffix}")
    if hidden_to_hidden is None or len(hidden_to_hidden) != 2:
        return None
    projection = shapes.get(f"{prefix}weight_hr{suffix}")
    hidden = projection[1] if projection is not None and len(projection) == 2 else hidden_to_hidden[1]
    stacked = shapes[name][0]
    if hidden < 1 or hidden_to_hidden[0] != stacked or stacked % hidden:
        return None
    count = stacked // hidden
    return count if count == 1 or count in GATES else None


def split_gates(records: Iterable[MatrixRecord]) -> Iterator[MatrixRecord]:
    """Replace every recurrent weight among ``records`` by its gate records (see module docstring).

    Other records pass through unchanged, in order.

    Args:
        records: the records of one source (a module, a file, a state dict).
    """
    records = list(records)
    shapes = {name: record.shape for record in records for name in (record.name, *record.aliases)}
    for record in records:
        count = gate_count(record.name, shapes)
        if count is None:
            yield record
        elif count == 1:
            yield dataclasses.replace(record, kind="recurrent")
        else:
            yield from _gate_records(record, GATES[count])


def _gate_records(record: MatrixRecord, gates: tuple[str, ...]) -> Iterator[MatrixRecord]:
    rows = record.shape[0] // len(gates)
    for index, gate in enumerate(gates):
        suffix = f".{gate}_gate"
        yield MatrixRecord(
            name=record.name + suffix,
            kind="recurrent",
            shape=(rows, record.shape[1]),
            dtype=record.dtype,
            source=record.source,
            aliases=tuple(alias + suffix for alias in record.aliases),
            _loader=_row_slice(record, index * rows, rows),
            _meta=record.is_meta,
        )


def _row_slice(record: MatrixRecord, start: int, rows: int) -> Callable[[], torch.Tensor]:
    # A view of the stored tensor: the gate's exact rows, no copy.
    return lambda: record.load().narrow(0, start, rows)
