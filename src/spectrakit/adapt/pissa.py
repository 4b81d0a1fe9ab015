"""PiSSA: LoRA started on the principal singular triplets (Meng et al., 2024).

With ``W = U Σ Vᵀ`` and its top-r triplets ``U_r, Σ_r, V_r``:

    A = Σ_r^{1/2} V_rᵀ / √s,   B = U_r Σ_r^{1/2} / √s,   W_res = W − s · B A,
    y = x W_resᵀ + b + s · (x Aᵀ) Bᵀ,

so the adapted layer equals the base layer at initialization and the frozen residual
``W_res`` is the best rank-deficient approximation of W (Eckart–Young). The top-r
factors come from ``spectrakit.linalg.svd(W, k=r, method="krylov")``: block Krylov
iterations whose residual stays within 1.001× the optimum even on the flat spectrum of a
randomly initialized layer (``svd_method="gram"`` for a full eigensolve, ``"exact"`` or
``"randomized"`` to choose another). Trainable parameters
per layer: ``r · (in + out)``; ``s = α / r`` with ``alpha`` defaulting to ``r``.

The initial factors ``A₀, B₀`` are kept as (unsaved) buffers: they turn the adapter
into a plain LoRA on the *original* weight, ``ΔW = s·(B A − B₀ A₀)``, for PEFT export.

``residual=True`` (set by :func:`spectrakit.load_adapter` for an adapter written by
:func:`spectrakit.adapt.init_from_checkpoint`) wraps a layer that already holds ``W_res``:
no SVD, nothing subtracted; ``A, B`` are then loaded, and ``A₀ = B₀ = 0`` (the adapter is a
LoRA on the residual it was loaded onto).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "pissa", rank=4)
>>> sk.trainable_parameters(model)
384
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import register
from .lora import LoRALinear


@register
class PiSSALinear(LoRALinear):
    method = "pissa"
    options: ClassVar[tuple[str, ...]] = ("alpha", "svd_method")
    rewrites_base = True
    which = "top"  # MiLoRA takes the bottom triplets instead
    A0: torch.Tensor  # buffers: the initial factors, subtracted from the base weight
    B0: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 svd_method: str = "krylov", residual: bool = False, init: dict[str, Any] | None = None) -> None:
        self.svd_method = svd_method
        self.residual = bool(residual)
        super().__init__(base_layer, rank, name=name, alpha=alpha, rslora=False, init=init)
        with torch.no_grad():
            self.new_buffer("A0", self.lora_A.detach().clone())
            self.new_buffer("B0", self.lora_B.detach().clone())
            if not self.residual:
                self.subtract_from_base(self.B0, self.A0, self.scaling)

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"rank": self.rank, "alpha": self.alpha, "svd_method": self.svd_method}
        return {**config, "residual": True} if self.residual else config

    def initial_factors(self, init: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.residual:  # the base is W_res already; A and B are loaded next
            return (torch.zeros(self.rank, self.in_features, dtype=self.adapter_dtype),
                    torch.zeros(self.out_features, self.rank, dtype=self.adapter_dtype))
        U, S, Vh = self.factors(self.rank, self.which, self.svd_method)
        root = (S / self.scaling).sqrt()
        return root[:, None] * Vh, U * root[None, :]
