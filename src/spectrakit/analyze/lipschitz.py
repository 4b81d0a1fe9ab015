"""Per-layer Lipschitz constants (spectral norms) three ways, and the whole-model product bound.

For a Linear layer the Lipschitz constant is σ₁(W). For a stride-1 convolution with
circular padding it is ``max_ω σ₁(K̂(ω))`` over the per-frequency matrices of the
kernel (:func:`spectrakit.linalg.conv_frequency_matrices`) — not the norm of the
kernel reshaped to ``c_out × (c_in·k²)``, which can be off either way. Each layer gets

* ``power``: power iteration (an estimate from below),
* ``gram``: the Gram-iteration bound (Delattre et al., 2023; certified from above),
* ``exact``: the full spectrum (SVD of W, or of every ``K̂(ω)``),
* for convs, ``reshaped``: σ₁ of the reshaped kernel, for comparison,

with the time each took. For a network that chains these layers with 1-Lipschitz
activations, ``Π σ₁`` bounds the whole model's Lipschitz constant.

>>> import torch, spectrakit as sk
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
...                           torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10))
>>> table = sk.lipschitz(net, example_input=torch.randn(1, 3, 16, 16), progress=False)
>>> bool(table.rows[0]["gram"] >= table.rows[0]["exact"] * (1 - 1e-9))
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from ..weights import iter_matrices
from .table import SpectrumTable

LIPSCHITZ_DISPLAY = (
    ("name", "name"), ("kind", "kind"), ("power", "power"), ("gram", "Gram bound"),
    ("exact", "exact"), ("reshaped", "reshaped kernel"), ("status", "status"),
)


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    start = time.perf_counter()
    value = float(fn())
    return value, time.perf_counter() - start


def _input_shapes(model: nn.Module, example_input: Any) -> dict[str, tuple[int, ...]]:
    """Spatial input size of every conv module, by one forward pass of ``example_input``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            def hook(_module: nn.Module, inputs: tuple, _output: Any, name: str = name) -> None:
                shapes[name] = tuple(inputs[0].shape[2:])
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**example_input) if isinstance(example_input, dict) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def layer_norms(weight: torch.Tensor, kind: str, input_shape: tuple[int, ...] | None = None,
                power_iters: int = 100, gram_iters: int = 10) -> dict[str, float]:
    """``power``, ``gram``, ``exact`` (and ``reshaped`` for convs) with their times.

    Args:
        weight: the layer's weight.
        kind: its record kind (``linear``, ``conv1d``, ``conv2d``, …).
        input_shape: a conv layer's input grid (circular padding).
        power_iters: power-iteration steps.
        gram_iters: Gram-iteration squarings of the certified bound.
    """
    if kind in ("conv1d", "conv2d"):
        if input_shape is None:
            raise SpectrakitError("a conv layer needs its input size: pass example_input= or input_shapes=")
        blocks = linalg.conv_frequency_matrices(weight.double(), input_shape)
        matrix = weight.double().flatten(1)
        row = {"reshaped": float(linalg.spectral_norm(matrix, "exact"))}
    else:
        blocks = weight.double()
        row = {}
    state = linalg.PowerIteration(n_iter=power_iters)
    row["power"], row["power_time_s"] = _timed(lambda: linalg.spectral_norm(blocks, "power", state=state).max())
    row["gram"], row["gram_time_s"] = _timed(lambda: linalg.spectral_norm(blocks, "gram", n_iter=gram_iters).max())
    row["exact"], row["exact_time_s"] = _timed(lambda: linalg.spectral_norm(blocks, "exact").max())
    return row


def lipschitz(model: nn.Module, *, example_input: Any = None,
              input_shapes: dict[str, tuple[int, ...]] | None = None, power_iters: int = 100,
              gram_iters: int = 10, progress: bool = True) -> SpectrumTable:
    """Spectral norms of every Linear / Conv layer of ``model``, and their product.

    Args:
        model: the network.
        power_iters: power-iteration steps per layer.
        gram_iters: Gram-iteration squarings per layer.
        progress: show a progress bar.
        example_input: one input batch, run once to learn each conv's input size.
        input_shapes: or give them directly, ``{"conv1": (32, 32)}``.

    Returns:
        A :class:`SpectrumTable`; ``table.summary()`` gains ``product_exact`` and
        ``product_gram`` (the whole-model bounds ``Π σ₁``).
    """
    shapes = dict(input_shapes or {})
    if example_input is not None:
        shapes.update(_input_shapes(model, example_input))
    records = [r for r in iter_matrices(model, kinds=("linear", "conv1d", "conv2d"))]
    rows = []
    for record in progress_bar(records, total=len(records), desc="lipschitz", enabled=progress):
        row: dict[str, Any] = {"name": record.name, "kind": record.kind,
                               "shape": "x".join(map(str, record.shape)), "status": "ok", "reason": ""}
        module_name = record.name.rsplit(".", 1)[0]
        try:
            row.update(layer_norms(record.load(), record.kind, shapes.get(module_name), power_iters, gram_iters))
        except SpectrakitError as error:
            row.update(status="skipped", reason=str(error))
        rows.append(row)
    products = {f"product_{column}": product_bound(rows, column) for column in ("power", "gram", "exact")}
    return SpectrumTable(rows=rows, source=type(model).__name__, display=LIPSCHITZ_DISPLAY,
                         extra_summary=products)


def product_bound(rows: list[dict[str, Any]], column: str = "exact") -> float:
    """``Π σ₁`` over the layers (``inf`` if any layer was skipped).

    Args:
        rows: the rows of :func:`lipschitz`'s table.
        column: which estimate to multiply (``exact``, ``gram``, ``power``).
    """
    if any(row["status"] != "ok" for row in rows):
        return math.inf
    return math.prod(row[column] for row in rows)
