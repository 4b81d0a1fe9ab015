"""EVA: LoRA initialized from the input activations' principal directions (Paischer et al., 2024).

For each target layer, the inputs ``X`` (one row per token) seen over the calibration
batches are folded into an incremental SVD (:class:`spectrakit.linalg.IncrementalSVD`,
no batch is kept), ``X ≈ Ũ S Ṽᵀ``. Then

    A = Ṽ_{r_l}ᵀ (top right-singular vectors of the activations),   B = 0,
    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,   s = alpha / rank,

and the per-layer ranks ``r_l`` are redistributed under one budget ``rank · L``: every
layer keeps at least one direction, the rest go to the components with the largest
explained variance ``σᵢ² / ‖X‖²_F`` over all layers, at most ``⌈rho · rank⌉`` per layer.
``s`` is the same for every layer (the per-layer ``alpha`` is ``alpha · r_l / rank``).
Exact at initialization (``B = 0``); trainable parameters ``Σ_l r_l (in_l + out_l)``.

Options: ``calibration`` (an iterable of model inputs: tensors, or dicts of keyword
arguments), ``rho`` (default 2), ``alpha`` (default ``rank``). The SVD is uncentered
(energy, not covariance).

>>> batches = [torch.randint(0, 100, (4, 16)) for _ in range(4)]      # doctest: +SKIP
>>> sk.adapt(model, "eva", rank=8, calibration=batches)               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import linalg
from .._targets import layer_weight
from ..errors import SpectrakitError
from .base import is_conv1d, register
from .lora import LoRALinear


@register
class EVALinear(LoRALinear):
    method = "eva"
    options = ("alpha", "calibration", "rho")

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name, alpha=alpha, rslora=False, init=init)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    @classmethod
    def plan(cls, model: nn.Module, layers: dict[str, nn.Module], rank: int,
             options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        calibration = options.get("calibration")
        if calibration is None:
            raise SpectrakitError("method 'eva' needs calibration=<iterable of model inputs>")
        rho = float(options.get("rho", 2.0))
        if rho < 1.0:
            raise SpectrakitError(f"rho={rho} must be ≥ 1")
        alpha = float(options.get("alpha") or rank)
        for name, layer in layers.items():  # rank validity before any forward pass
            out_f, in_f = _shape(layer)
            cls.check_layer(name, out_f, in_f, {"rank": rank})
        spectra = activation_spectra(model, layers, calibration, max_rank=math.ceil(rho * rank))
        ranks = allocate_ranks(spectra, budget=rank * len(layers))
        plan = {}
        for name, (_, Vh, _) in spectra.items():
            r = ranks[name]
            plan[name] = {"rank": r, "alpha": alpha * r / rank, "init": {"A": Vh[:r].clone()}}
        return plan


def _shape(layer: nn.Module) -> tuple[int, int]:
    weight = layer_weight(layer)
    out_f, in_f = (weight.shape[1], weight.shape[0]) if is_conv1d(layer) else weight.shape
    return int(out_f), int(in_f)


@torch.no_grad()
def activation_spectra(model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable[Any],
                       max_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{name: (S, Vh, ‖X‖²_F)}``: top singular values/right vectors of each layer's inputs."""
    trackers: dict[str, linalg.IncrementalSVD] = {}
    energy: dict[str, float] = {}
    hooks = []
    for name, layer in layers.items():
        out_f, in_f = _shape(layer)
        trackers[name] = linalg.IncrementalSVD(k=min(max_rank, out_f - 1, in_f - 1))
        energy[name] = 0.0

        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            trackers[name].update(rows)
            energy[name] += float((rows.double() ** 2).sum())

        hooks.append(layer.register_forward_pre_hook(record))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in calibration:
            model(**batch) if isinstance(batch, dict) else model(batch)
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if seen == 0:
        raise SpectrakitError("eva: calibration yielded no batches")
    spectra = {}
    for name, t in trackers.items():
        if t.S is None or t.Vh is None:
            raise SpectrakitError(f"eva: layer {name} received no input from the calibration batches")
        spectra[name] = (t.S, t.Vh, energy[name])
    return spectra


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, torch.Tensor, float]], budget: int) -> dict[str, int]:
    """Per-layer ranks: one each, then the remaining budget by explained variance, globally."""
    ranks = {name: 1 for name in spectra}
    candidates = []
    for name, (S, _, total) in spectra.items():
        ratios = (S.double() ** 2 / max(total, 1e-300)).tolist()
        candidates += [(ratio, name) for ratio in ratios[1:]]
    candidates.sort(key=lambda item: -item[0])
    for _, name in candidates[: max(budget - len(spectra), 0)]:
        ranks[name] += 1
    return ranks
