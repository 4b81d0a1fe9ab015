"""MiLoRA: PiSSA's construction on the *minor* singular triplets (Wang et al., 2024).

With the bottom-r triplets ``U_m, Σ_m, V_m`` of ``W`` (smallest singular values):

    A = Σ_m^{1/2} V_mᵀ / √s,   B = U_m Σ_m^{1/2} / √s,   W_res = W − s · B A,
    y = x W_resᵀ + b + s · (x Aᵀ) Bᵀ.

The principal subspace — where pretraining knowledge lives — stays frozen in
``W_res``; training starts from the directions W uses least. Exact at initialization.
The bottom triplets need the full thin SVD, computed once by the spectral core.
Trainable parameters per layer: ``r · (in + out)``.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "milora", rank=4)
>>> sk.trainable_parameters(model)
384
"""

from __future__ import annotations

from typing import ClassVar

from .base import register
from .pissa import PiSSALinear


@register
class MiLoRALinear(PiSSALinear):
    method = "milora"
    options: ClassVar[tuple[str, ...]] = ("alpha",)
    which = "bottom"
