"""BA-LoRA: LoRA plus three regularizers against inherited bias (Chang et al., 2024).

The update is LoRA's, ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` (``B = 0`` at initialization).
During a training forward the layer keeps its frozen output ``y₀ = x Wᵀ + b`` and its
adapted output ``y``, both as ``N × out`` matrices (``N`` tokens), and
:func:`spectrakit.adapter_penalty` returns

    λ_c · mean((y − y₀)²)                                    consistency: stay near the base
  + λ_d · Σ_{i≠j} C_ij² / out,   C = corr(y)                 diversity: decorrelated features
  − λ_s · Σ_{i≤k} σᵢ(y) / Σᵢ σᵢ(y)                           SVD: energy in the top-k directions

with ``corr`` the feature correlation matrix of the batch and ``σ(y)`` from
``spectrakit.linalg.svdvals`` (exact, differentiable). The paper states the three terms on
the model's final outputs; here each adapted layer regularizes its own output, which
keeps the method inside the adapter protocol (no second model for the consistency
target: ``y₀`` comes from the same forward). Trainable parameters per layer:
``r · (in + out)``; merges exactly like LoRA.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "ba-lora", rank=4)
>>> sk.trainable_parameters(model)
384
>>> _ = model(torch.randn(16, 64))            # a training forward
>>> sk.adapter_penalty(model).requires_grad   # add it to the loss with a weight
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import register
from .lora import LoRALinear, add_low_rank


def balora_terms(adapted: torch.Tensor, frozen: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(consistency, diversity, svd)`` of ``N × out`` outputs (the formulas above, unweighted).

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
    values = linalg.svdvals(adapted, method="exact")
    svd = -values[:k].sum() / values.sum().clamp_min(1e-12)
    return consistency, diversity, svd


@register
class BALoRALinear(LoRALinear):
    method = "ba-lora"
    options = ("alpha", "consistency", "diversity", "svd", "svd_k")

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 consistency: float = 1.0, diversity: float = 1.0, svd: float = 1.0, svd_k: int | None = None,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name, alpha=alpha, rslora=False, init=init)
        self.consistency, self.diversity, self.svd = float(consistency), float(diversity), float(svd)
        self.svd_k = int(rank if svd_k is None else svd_k)
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        k = kwargs.get("svd_k")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= out_features):
            raise SpectrakitError(f"svd_k={k!r} must be an integer in 1..{out_features} for layer {name}")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "consistency": self.consistency,
                "diversity": self.diversity, "svd": self.svd, "svd_k": self.svd_k}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        out = add_low_rank(base, self.adapter_input(x), self.lora_A.T, self.lora_B.T, self.scaling)
        # only a training forward feeds the penalty; evaluation keeps nothing alive
        self._outputs = (out, base) if torch.is_grad_enabled() else None
        return out

    def penalty(self) -> torch.Tensor | None:
        if self._outputs is None:
            return None
        out, base = self._outputs
        adapted = out.reshape(-1, out.shape[-1]).to(self.adapter_dtype)
        frozen = base.reshape(-1, base.shape[-1]).to(self.adapter_dtype).detach()
        consistency, diversity, svd = balora_terms(adapted, frozen, self.svd_k)
        return self.consistency * consistency + self.diversity * diversity + self.svd * svd
