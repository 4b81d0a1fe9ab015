"""A small fine-tuning loop for byte-level causal LMs (the CLI and ``bench/adapters.py``).

Loss is next-byte cross-entropy; held-out quality is reported in bits per byte
(cross-entropy / ln 2) on deterministic evaluation windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import adapter_penalty

#: Adam learning rates that suit each method on the reference model: methods that
#: train a few singular values or spectral coefficients need larger steps.
DEFAULT_LR = {"lora": 2e-3, "pissa": 2e-3, "milora": 2e-3, "soma": 2e-3, "eva": 2e-3, "salt": 2e-3,
              "sorsa": 2e-3, "spectral": 2e-3, "hra": 2e-3, "svfit": 1e-2, "svft": 1e-2,
              "fourierft": 5e-2, "full": 3e-4,
              "asymmetric": 2e-3, "lorma": 2e-3, "qgoft": 1e-2, "ba-lora": 2e-3, "sst": 2e-3, "sara": 2e-3,
              "soda": 1e-2, "dota": 2e-3, "clover": 1e-2, "lq-lora": 2e-3}


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``batch`` (``[b, seq+1]`` byte ids)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Held-out bits per byte of ``model`` on ``windows`` (from ``spectrakit.data.eval_windows``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        total += float(lm_loss(model, chunk)) * chunk.shape[0] * (chunk.shape[1] - 1)
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    model.train(was_training)
    return total / count / math.log(2)


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, bits per byte)
    step_seconds: list[float] = field(default_factory=list)


def finetune(model: nn.Module, batches: Iterable[torch.Tensor], lr: float, *, penalty_weight: float = 0.0,
             eval_every: int | None = None, evaluate: Callable[[nn.Module], float] | None = None,
             progress: Callable[[Iterable], Iterable] = lambda items: items,
             weight_decay: float = 0.0,
             loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> TrainLog:
    """Adam(W) on the trainable parameters; optional adapter penalty and periodic evaluation.

    ``loss_fn(model, batch)``: the loss to minimize (default :func:`lm_loss`, next-byte
    cross-entropy of ``[b, seq+1]`` byte ids); ``spectrakit.compress`` passes its own.
    ``optimizer``: use this one instead of AdamW (``lr`` and ``weight_decay`` are then
    ignored; ``spectrakit.optimize`` passes its own); ``scheduler``: stepped after each step.
    """
    loss_fn = loss_fn or lm_loss
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    log = TrainLog()
    model.train()
    step = 0
    for batch in progress(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        total = loss + penalty_weight * adapter_penalty(model) if penalty_weight else loss
        total.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        log.step_seconds.append(time.perf_counter() - start)
        log.losses.append(float(loss.detach()))
        step += 1
        if evaluate is not None and eval_every and step % eval_every == 0:
            log.evals.append((step, evaluate(model)))
    return log
