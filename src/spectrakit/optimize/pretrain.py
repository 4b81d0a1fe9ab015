"""Training the reference architecture from scratch (``spectrakit pretrain``, ``bench/optimize.py``).

The model is the bundled reference model's architecture (a byte-level Llama, the
shipped ``config.json``) with a fresh, seeded initialization; the data is the stdlib
code corpus (``spectrakit.data.code_corpus``); the loop is :func:`spectrakit.adapt.train.finetune`
with the optimizer and an LR schedule passed in; quality is held-out bits per byte.

>>> sched = warmup_cosine(steps=100, warmup=10)
>>> round(sched(0), 2), round(sched(10), 2), round(sched(100), 2)
(0.1, 1.0, 0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def fresh_reference_model(seed: int = 0) -> nn.Module:
    """The reference architecture (``spectrakit.reference.reference_config()``), initialized
    from ``seed`` (the caller's RNG is left as it was), in train mode.

    Args:
        seed: the initialization seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..reference import reference_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_dict(reference_config()))
    return model.float().train()


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """The LR factor at each step: linear warmup over ``warmup`` steps, then a cosine
    decay to ``floor`` at ``steps`` (a ``LambdaLR`` lambda; it scales every group alike).

    Args:
        steps: total steps.
        warmup: warmup steps (0: none).
        floor: the final factor.
    """
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (moments, factors,
    bases; a wrapper's inner optimizer counted through its ``state``)."""
    total = 0
    seen: set[int] = set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and id(value) not in seen and value.dim() > 0:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total
