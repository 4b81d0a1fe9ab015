"""BA-LoRA: LoRA plus three regularizers against inherited bias (Chang et al., 2024).

The update is LoRA's, ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` (``B = 0`` at initialization).
Trainable parameters per layer: ``r · (in + out)``; merges exactly like LoRA.

**On the model's outputs** (``level="model"``, the default; the paper's form). With the
adapted model's logits ``Z`` and the pretrained model's ``Z₀`` on the same batch, both
``N × V`` (``N`` tokens, ``V`` classes or vocabulary), :func:`output_penalty` returns
``λ_c·C + λ_d·D + λ_s·S`` with, for generation (``task="nlg"``),

    C = (1/N) Σₙ KL(softmax(Z₀ₙ) ‖ softmax(Zₙ))                consistency: keep the base's knowledge
    D = −(1/N) Σₙ H(softmax(Zₙ))                              diversity: no collapsed distributions
    S = −Σ_{i≤k} σᵢ(Z) / Σᵢ σᵢ(Z)                              SVD: energy in the top-k directions

and for understanding (``task="nlu"``) ``C = mean((Z/‖Z‖ − Z₀/‖Z₀‖)²)`` (rows normalized) and
``D = Σ_{i≠j} Cov(Z)ᵢⱼ² / V``. ``Z₀`` costs one extra forward without gradients of the same
model with its BA-LoRA updates switched off (:func:`adapters_off`): no second copy of the
model. ``σ`` from ``spectrakit.linalg.svdvals`` (exact, differentiable). The paper's
weights are ``λ_c, λ_d, λ_s = 1e-4, 3e-4, 1e-4`` and ``k = 3``; here ``consistency``,
``diversity``, ``svd`` default to 1 (scale the sum like any :func:`spectrakit.adapter_penalty`)
and ``svd_k`` to the rank.

**Per layer** (``level="layer"``): each adapted layer keeps its frozen output ``y₀`` and
adapted output ``y`` of the last training forward and :func:`spectrakit.adapter_penalty`
returns ``λ_c·mean((y − y₀)²) + λ_d·Σ_{i≠j} corr(y)ᵢⱼ²/out − λ_s·Σ_{i≤k}σᵢ(y)/Σσᵢ(y)`` summed
over layers — no extra forward, but one SVD per layer and step.

>>> import torch, spectrakit as sk
>>> from spectrakit.adapt.balora import adapters_off, output_penalty
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "ba-lora", rank=4)
>>> sk.trainable_parameters(model)
384
>>> x = torch.randn(16, 64)
>>> logits = model(x)                          # a training forward
>>> with torch.no_grad(), adapters_off(model):
...     base_logits = model(x)
>>> output_penalty(model, logits, base_logits).requires_grad   # add it to the loss
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import adapted_layers, register
from .lora import LoRALinear, add_low_rank

LEVELS = ("model", "layer")
TASKS = ("nlg", "nlu")


def balora_terms(adapted: torch.Tensor, frozen: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(consistency, diversity, svd)`` of one layer's ``N × out`` outputs (``level="layer"``, unweighted).

    Args:
        adapted: the adapted layer's outputs.
        frozen: the base layer's outputs on the same inputs.
        k: how many top singular values the SVD term rewards.
    """
    consistency = (adapted - frozen).square().mean()
    centered = adapted - adapted.mean(dim=0, keepdim=True)
    scaled = centered / centered.norm(dim=0, keepdim=True).clamp_min(1e-12)
    correlation = scaled.T @ scaled
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    diversity = off_diagonal.square().sum() / adapted.shape[1]
    return consistency, diversity, _svd_term(adapted, k)


def _svd_term(outputs: torch.Tensor, k: int) -> torch.Tensor:
    values = linalg.svdvals(outputs, method="exact")
    return -values[:k].sum() / values.sum().clamp_min(1e-12)


def output_terms(logits: torch.Tensor, base_logits: torch.Tensor, k: int,
                 task: str = "nlg") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(consistency, diversity, svd)`` on the model's outputs (the formulas above, unweighted).

    Args:
        logits: the adapted model's outputs, ``… × V`` (flattened to ``N × V``).
        base_logits: the pretrained model's outputs on the same inputs (no gradient flows into them).
        k: how many top singular values the SVD term rewards.
        task: ``"nlg"`` (KL and entropy of the softmax) or ``"nlu"`` (normalized MSE and covariance).
    """
    if task not in TASKS:
        raise SpectrakitError(f"task={task!r} must be one of {', '.join(TASKS)}")
    if logits.shape != base_logits.shape:
        raise SpectrakitError(f"base_logits: shape {tuple(base_logits.shape)} differs from the logits' "
                              f"{tuple(logits.shape)}")
    Z = logits.reshape(-1, logits.shape[-1]).float()
    Z0 = base_logits.reshape(-1, base_logits.shape[-1]).float().detach()
    if task == "nlg":
        log_p, log_q = torch.log_softmax(Z, dim=-1), torch.log_softmax(Z0, dim=-1)
        consistency = (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()
        diversity = (log_p.exp() * log_p).sum(dim=-1).mean()
    else:
        unit, unit0 = nn.functional.normalize(Z, dim=-1), nn.functional.normalize(Z0, dim=-1)
        consistency = (unit - unit0).square().mean()
        centered = Z - Z.mean(dim=0, keepdim=True)
        covariance = centered.T @ centered / max(Z.shape[0] - 1, 1)
        diversity = (covariance - torch.diag(torch.diagonal(covariance))).square().sum() / Z.shape[1]
    return consistency, diversity, _svd_term(Z, k)


def _balora_layers(model: nn.Module, caller: str) -> list[BALoRALinear]:
    layers = [layer for layer in adapted_layers(model).values() if isinstance(layer, BALoRALinear)]
    if not layers:
        raise SpectrakitError(f"{caller}: the model has no 'ba-lora' adapters")
    return layers


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every ``ba-lora`` layer of ``model`` computes its frozen base output,
    so ``model(x)`` gives the pretrained model's outputs (use it under ``torch.no_grad()``).

    Args:
        model: a model adapted with ``"ba-lora"``.
    """
    layers = _balora_layers(model, "adapters_off")
    for layer in layers:
        layer.bypass = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.bypass = False


def output_penalty(model: nn.Module, logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """BA-LoRA's weighted regularizer on the model's outputs, with the weights, ``k`` and task
    the model was adapted with.

    Args:
        model: a model adapted with ``"ba-lora"``.
        logits: its outputs on a batch (with gradients).
        base_logits: the same model's outputs under :func:`adapters_off` on the same batch.
    """
    layer = _balora_layers(model, "output_penalty")[0]
    consistency, diversity, svd = output_terms(logits, base_logits, layer.svd_k, layer.task)
    return layer.consistency * consistency + layer.diversity * diversity + layer.svd * svd


@register
class BALoRALinear(LoRALinear):
    method = "ba-lora"
    options = ("alpha", "consistency", "diversity", "svd", "svd_k", "level", "task")

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 consistency: float = 1.0, diversity: float = 1.0, svd: float = 1.0, svd_k: int | None = None,
                 level: str = "model", task: str = "nlg", init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name, alpha=alpha, rslora=False, init=init)
        self.consistency, self.diversity, self.svd = float(consistency), float(diversity), float(svd)
        self.svd_k = int(rank if svd_k is None else svd_k)
        self.level, self.task = level, task
        self.bypass = False
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        k = kwargs.get("svd_k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise SpectrakitError(f"svd_k={k!r} must be a positive integer")
        if kwargs.get("level", "model") not in LEVELS:
            raise SpectrakitError(f"level={kwargs.get('level')!r} must be one of {', '.join(LEVELS)}")
        if kwargs.get("task", "nlg") not in TASKS:
            raise SpectrakitError(f"task={kwargs.get('task')!r} must be one of {', '.join(TASKS)}")
        if kwargs.get("level") == "layer" and k is not None and k > out_features:
            raise SpectrakitError(f"svd_k={k!r} must be at most {out_features} for layer {name}")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "consistency": self.consistency,
                "diversity": self.diversity, "svd": self.svd, "svd_k": self.svd_k, "level": self.level,
                "task": self.task}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.bypass:
            return base
        out = add_low_rank(base, self.adapter_input(x), self.lora_A.T, self.lora_B.T, self.scaling)
        # only a training forward of the per-layer variant feeds the penalty; nothing else is kept alive
        self._outputs = (out, base) if self.level == "layer" and torch.is_grad_enabled() else None
        return out

    def penalty(self) -> torch.Tensor | None:
        if self._outputs is None:
            return None
        out, base = self._outputs
        adapted = out.reshape(-1, out.shape[-1]).to(self.adapter_dtype)
        frozen = base.reshape(-1, base.shape[-1]).to(self.adapter_dtype).detach()
        consistency, diversity, svd = balora_terms(adapted, frozen, self.svd_k)
        return self.consistency * consistency + self.diversity * diversity + self.svd * svd
