"""DoTA: tensor-train (MPO) adapters initialized from the weight itself (Hu et al., 2024; seed 002).

W (``out × in``) is read as a tensor with ``out = o₁⋯o_n``, ``in = i₁⋯i_n`` (``n = cores``,
balanced factors) and written as a matrix product operator

    W[(o₁…o_n), (i₁…i_n)] ≈ Σ_{χ} G₁[o₁, i₁, χ₁] G₂[χ₁, o₂, i₂, χ₂] ⋯ G_n[χ_{n−1}, o_n, i_n],

found by the TT-SVD sweep (one ``spectrakit.linalg.svd`` per bond, truncated to the bond
dimension ``χ = rank``); with an untruncated bond it contracts back to W exactly. The cores
train, starting at that decomposition ``G⁰``, and the frozen part absorbs the rest:

    W' = W − MPO(G⁰) + MPO(G),     y = x Wᵀ + b + x (MPO(G) − MPO(G⁰))ᵀ,

exact at initialization. The update is formed densely each step (one contraction,
``O(out·in·χ)``) and applied as one matmul with ``W + ΔW``. Trainable parameters per layer:
``Σ_k χ_{k−1} o_k i_k χ_k`` (``χ₀ = χ_n = 1``, each ``χ_k`` capped by its unfolding's rank).
Merges exactly.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "dota", rank=4, cores=3)
>>> sk.trainable_parameters(model)   # o = (4, 4, 2), i = (4, 4, 4): 1·4·4·4 + 4·4·4·4 + 4·2·4·1
352
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, register


def balanced_factors(size: int, count: int) -> list[int]:
    """``count`` integers with product ``size``, as equal as a greedy prime split makes them."""
    primes, n, p = [], size, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    factors = [1] * count
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return factors


def mpo_decompose(weight: torch.Tensor, outs: list[int], ins: list[int], bond: int) -> list[torch.Tensor]:
    """TT-SVD of an ``out × in`` matrix into cores ``(χ_{k−1}, o_k, i_k, χ_k)``, bonds ≤ ``bond``.

    Args:
        weight: the matrix, ``out = ∏ outs``, ``in = ∏ ins``.
        outs: the output-side factors.
        ins: the input-side factors.
        bond: the largest bond dimension kept (the truncation).
    """
    n = len(outs)
    tensor = weight.reshape(*outs, *ins)
    tensor = tensor.permute(*[j for k in range(n) for j in (k, n + k)])  # (o₁, i₁, o₂, i₂, …)
    cores, left = [], 1
    rest = tensor.reshape(outs[0] * ins[0], -1)
    for k in range(n - 1):
        U, S, Vh = linalg.svd(rest, method="exact")
        keep = min(bond, int(S.numel()))
        cores.append(U[:, :keep].reshape(left, outs[k], ins[k], keep))
        left = keep
        rest = (S[:keep, None] * Vh[:keep]).reshape(left * outs[k + 1] * ins[k + 1], -1)
    cores.append(rest.reshape(left, outs[-1], ins[-1], 1))
    return cores


def mpo_contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """The ``out × in`` matrix of an MPO (the inverse of :func:`mpo_decompose` at full bond)."""
    outs, ins = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    product = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        product = (product @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    n = len(cores)
    tensor = product.reshape([d for k in range(n) for d in (outs[k], ins[k])])
    order = [2 * k for k in range(n)] + [2 * k + 1 for k in range(n)]
    out_size, in_size = int(torch.tensor(outs).prod()), int(torch.tensor(ins).prod())
    return tensor.permute(*order).reshape(out_size, in_size)


@register
class DoTALinear(AdaptedLinear):
    method = "dota"
    options = ("cores",)

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", cores: int = 3,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.cores = int(cores)
        self.outs, self.ins = balanced_factors(self.out_features, self.cores), balanced_factors(self.in_features,
                                                                                                self.cores)
        weight = self.base_weight().detach().to(torch.float64)
        initial = mpo_decompose(weight, self.outs, self.ins, rank)
        self.mpo = nn.ParameterList([self.new_parameter(core) for core in initial])
        for k, core in enumerate(initial):
            self.new_buffer(f"initial_{k}", core)

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        cores = kwargs.get("cores", 3)
        if not isinstance(cores, int) or isinstance(cores, bool) or cores < 2:
            raise SpectrakitError(f"cores={cores!r} must be an integer ≥ 2")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "cores": self.cores}

    def initial_cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"initial_{k}") for k in range(self.cores)]

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():  # the initial cores are frozen: their contraction needs no graph
            initial = mpo_contract(self.initial_cores())
        return mpo_contract(list(self.mpo)) - initial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ΔW is dense, so its gradient is a full gᵀx anyway: one product with W + ΔW (and one
        # input gradient in the backward) instead of a base product plus a ΔW product
        weight = self.base_weight().to(self.adapter_dtype) + self.delta_weight()
        bias = self.base_layer.bias
        out = nn.functional.linear(self.adapter_input(x), weight, None if bias is None else bias.to(weight.dtype))
        return out.to(x.dtype)
