"""SVD-LLM's sequential low-rank update (``lora_update=True``): fine-tune the factors after truncation.

Truncation leaves each layer as ``W' = up · down``. The update trains, on the calibration
batches and through :func:`spectrakit.adapt.train.finetune`, first every compressed layer's
``up`` (the U side) with all else frozen, then every ``down`` (the V side) with the new
``up`` frozen:

.. math::  up \\leftarrow \\arg\\min_{up} \\mathcal{L}(up \\cdot down), \\qquad
           down \\leftarrow \\arg\\min_{down} \\mathcal{L}(up \\cdot down)

(a few Adam steps each, not the minimum), as SVD-LLM alternates its LoRA on the two sides.
No parameter is added (the factors are trained in place), so the parameter count and
the saved format do not change. The loss is ``loss_fn`` when given, else the calibration
loss of FWSVD (:func:`~spectrakit.compress.calibration.default_loss`: the model's ``.loss``
or next-token cross-entropy on token ids).

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
>>> batches = [torch.randn(32, 16) for _ in range(2)]
>>> loss = lambda model, x: model(x).square().mean()
>>> report = sk.compress(model, method="svd", rank=4, calibration=batches, loss_fn=loss, lora_update=True)
>>> report.lora_loss_after <= report.lora_loss_before
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from .lowrank import LowRankLinear
from .sensitivity import calibration_loss


def sequential_update(model: nn.Module, layers: Sequence[LowRankLinear], batches: Sequence[Any],
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor], lr: float = 1e-4,
                      epochs: int = 2) -> tuple[float, float]:
    """Train ``up`` then ``down`` of ``layers`` on ``batches``; returns the calibration loss
    before and after. Every parameter's ``requires_grad`` and the model's mode are restored.

    Args:
        model: the compressed model.
        layers: its :class:`LowRankLinear` layers to update.
        batches: the calibration batches (each side makes ``epochs`` passes over them).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        lr: Adam's learning rate.
        epochs: passes over ``batches`` per side.
    """
    from ..adapt.train import finetune  # adapt is not needed to import compress

    if not lr > 0 or not isinstance(epochs, int) or epochs < 1:
        raise SpectrakitError(f"lora_update: lora_lr={lr!r} must be > 0 and lora_epochs={epochs!r} an integer >= 1")
    before = calibration_loss(model, batches, loss_fn)
    if not layers:
        return before, before
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    try:
        for side in ("up", "down"):
            for p, _, _ in flags:
                p.requires_grad_(False)
            for layer in layers:
                getattr(layer, side).requires_grad_(True)
            finetune(model, [batch for _ in range(epochs) for batch in batches], lr, loss_fn=loss_fn)
    finally:
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return before, calibration_loss(model, batches, loss_fn)
