"""Representation spectra: the eigenvalues of a layer's feature autocorrelation.

For features ``Z ∈ ℝ^{n×d}`` (rows = samples; sequence outputs are flattened to
``(batch·tokens) × d``) and row-normalized ``ẑᵢ = zᵢ/‖zᵢ‖``, the autocorrelation
``C = (1/n) Σ ẑᵢẑᵢᵀ`` has eigenvalues ``λ ≥ 0`` with ``Σλ = 1``. From them:

* **von Neumann entropy** (Kim et al., 2023): ``VNE = −Σ λ log λ``; low values mean
  dimensional collapse;
* **effective rank** ``exp(VNE)``;
* **nuclear norm** of the raw features ``‖Z‖_* = Σσᵢ(Z)``, exactly (from the
  singular values) and by the SVD-free L1,2 approximation of the Matrix
  Nuclear-Norm paper: the sum of the ``min(n, d)`` largest column L2 norms of ``Z``.
  Each is timed, since the approximation exists to be cheap.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> table = sk.analyze_features(model, [torch.randn(32, 8)], layers=["0", "2"], progress=False)
>>> [row["dim"] for row in table]
[16, 4]
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .. import linalg
from .._progress import progress as progress_bar
from ..errors import SpectrakitError
from .table import SpectrumTable

FEATURE_DISPLAY = (
    ("name", "layer"), ("samples", "samples"), ("dim", "dim"), ("vne", "VNE"),
    ("effective_rank", "eff. rank"), ("nuclear_norm", "‖Z‖_*"), ("nuclear_norm_l12", "L1,2 approx"),
    ("status", "status"),
)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def feature_spectrum(Z: torch.Tensor) -> dict[str, float]:
    """Spectral summaries of one feature matrix ``Z`` (``n × d``), see the module docstring."""
    Z = Z.to(torch.float64)
    n, d = Z.shape
    start = time.perf_counter()
    singular_values = linalg.svdvals(Z, method="exact")
    nuclear_time = time.perf_counter() - start
    start = time.perf_counter()
    column_norms = Z.norm(dim=0)
    l12 = float(column_norms.topk(min(n, d)).values.sum())
    l12_time = time.perf_counter() - start
    norms = Z.norm(dim=1, keepdim=True)
    Zn = Z[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
    eigenvalues = linalg.svdvals(Zn, method="exact").square() / max(Zn.shape[0], 1)
    p = eigenvalues[eigenvalues > 0]
    p = p / p.sum()
    vne = float(-(p * p.log()).sum())
    return {
        "samples": n,
        "dim": d,
        "vne": vne,
        "effective_rank": math.exp(vne),
        "rank_fraction": math.exp(vne) / d,
        "top_eigenvalue_fraction": float(p[0]),
        "nuclear_norm": float(singular_values.sum()),
        "nuclear_norm_l12": l12,
        "nuclear_time_s": nuclear_time,
        "nuclear_l12_time_s": l12_time,
    }


def _select(model: nn.Module, layers: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if layers is None:
        return [("output", model)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = []
    for pattern in patterns:
        if pattern in named:
            chosen.append((pattern, named[pattern]))
            continue
        matches = [(name, module) for name, module in named.items() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise SpectrakitError(f"layers: pattern {pattern!r} matches no module of {type(model).__name__}")
        chosen.extend(matches)
    return list(dict(chosen).items())


def analyze_features(model: nn.Module, batches: Iterable[Any], layers: str | Sequence[str] | None = None,
                     *, max_samples: int = 4096, progress: bool = True) -> SpectrumTable:
    """Spectra of the features (outputs) of ``layers`` over ``batches``.

    Args:
        progress: show a progress bar over the batches.
        model: any module; it runs in ``eval`` mode under ``torch.no_grad``.
        batches: tensors (called as ``model(x)``) or dicts (``model(**x)``).
        layers: module names or fnmatch patterns (``None``: the model's own output;
            for tuple / ``ModelOutput`` results the first tensor is used).
        max_samples: feature rows kept per layer (sequence outputs count every token).
    """
    targets = _select(model, layers)
    collected: dict[str, list[torch.Tensor]] = {name: [] for name, _ in targets}
    counts = dict.fromkeys(collected, 0)

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None or counts[name] >= max_samples:
                return
            rows = tensor.detach().reshape(-1, tensor.shape[-1]) if tensor.ndim > 1 else tensor.detach()[None]
            rows = rows[: max_samples - counts[name]].to("cpu", torch.float64)
            collected[name].append(rows)
            counts[name] += rows.shape[0]
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress_bar(batches, desc="features", enabled=progress):
                model(**batch) if isinstance(batch, dict) else model(batch)
                if all(count >= max_samples for count in counts.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = []
    for name, _ in targets:
        row: dict[str, Any] = {"name": name, "status": "ok", "reason": ""}
        if not collected[name]:
            row.update(status="skipped", reason="produced no tensor output")
        else:
            Z = torch.cat(collected[name])
            if not bool(torch.isfinite(Z).all()):
                row.update(status="skipped", reason="features contain NaN or Inf values")
            elif Z.shape[0] < 2:
                row.update(status="skipped", reason="fewer than 2 feature rows")
            else:
                row.update(feature_spectrum(Z))
        rows.append(row)
    return SpectrumTable(rows=rows, source=type(model).__name__, display=FEATURE_DISPLAY)
