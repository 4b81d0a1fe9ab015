"""SST: sparse spectral training (Zhao et al., 2024; seeds 000, 003).

The layer is re-parametrized by its full thin SVD ``W = U diag(σ) Vᵀ`` (``k = min(out, in)``,
exact, from ``spectrakit.linalg.svd``). All ``k`` singular values train; of the singular
vectors, only ``r`` pairs train at a time — the columns ``I`` drawn, without replacement,
with probability ∝ σ:

    Ũ = U with columns I replaced by U_I,   Ṽ = V likewise,
    W' = Ũ diag(s) Ṽᵀ,     y = ((x Ṽ) ⊙ s) Ũᵀ + b.

:func:`resample_vectors` ends a round: the trained columns are written back into ``U, V``,
every ``orthogonalize_every`` rounds ``Ũ diag(s) Ṽᵀ`` is re-factorized by SVD (so the
bases are orthonormal again and ``s`` are its singular values), and a new set ``I`` is drawn
∝ ``s`` (seeded by ``seed`` and the round). Reset the optimizer state of the vector
parameters at a round (pass the optimizer).

At initialization ``W' = U diag(σ) Vᵀ = W`` up to the SVD's rounding (≈1e-7 relative in
float32). Trainable parameters per layer: ``k + r · (in + out)``. The adapter file also
carries the current bases ``U, V`` and the drawn indices: after a few rounds they are no
longer the SVD of W, so the file is about the size of the weight (SST is a training method
first). Merges exactly (``W ← Ũ diag(s) Ṽᵀ``). The forward costs ``2k(in + out)`` per token
against LoRA's ``in·out + 2r(in+out)``: about 4× a square layer's matmul.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "sst", rank=4)
>>> sk.trainable_parameters(model)            # 32 singular values + 4·(64 + 32)
416
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, adapted_layers, register


def _draw(values: torch.Tensor, rank: int, seed: int, round_: int) -> torch.Tensor:
    """``rank`` distinct indices drawn with probability ∝ ``values`` (reproducible per round)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_)
    weights = values.detach().to("cpu", torch.float64).clamp_min(0)
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    return torch.multinomial(weights, rank, replacement=False, generator=generator).sort().values


class _SpectralProduct(torch.autograd.Function):
    """``y = ((x Ṽ) ⊙ s) Ũᵀ`` for 2-D ``x``, where ``Ũ, Ṽ`` are the frozen bases with the columns
    ``index`` replaced by the trained ``U_I, V_I``.

    Autograd through ``index_copy`` would form the gradient of the whole bases (two more
    products of the size of W) only to keep ``r`` columns of it; this backward forms the ``r``
    columns directly: ``∂U_I = gᵀ (z_I ⊙ s_I)``, ``∂V_I = xᵀ ((g Ũ) ⊙ s)_I``, with ``z = x Ṽ``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, U_selected: torch.Tensor, V_selected: torch.Tensor,
                U: torch.Tensor, V: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        U_full, V_full = U.index_copy(1, index, U_selected), V.index_copy(1, index, V_selected)
        z = x @ V_full
        ctx.save_for_backward(x, z, values, U_full, V_full, index)
        return (z * values) @ U_full.T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, z, values, U_full, V_full, index = ctx.saved_tensors
        need_x, need_values, need_U, need_V = ctx.needs_input_grad[:4]
        gu = g @ U_full
        gz = gu * values
        grad_x = gz @ V_full.T if need_x else None
        grad_values = (gu * z).sum(0) if need_values else None
        grad_U = g.T @ (z.index_select(1, index) * values[index]) if need_U else None
        grad_V = x.T @ gz.index_select(1, index) if need_V else None
        return grad_x, grad_values, grad_U, grad_V, None, None, None


@register
class SSTLinear(AdaptedLinear):
    method = "sst"
    options = ("seed", "orthogonalize_every")
    U: nn.Parameter
    V: nn.Parameter
    singular_values: nn.Parameter
    U_selected: nn.Parameter
    V_selected: nn.Parameter
    selected: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", seed: int = 0,
                 orthogonalize_every: int = 1, sampling_round: int = 0,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.seed, self.orthogonalize_every = int(seed), int(orthogonalize_every)
        self.round = int(sampling_round)  # saved, so that a loaded adapter draws the next rounds alike
        U, S, Vh = linalg.svd(self.base_weight().detach(), method="exact", dtype=torch.float64)
        frozen = {"requires_grad": False}
        self.U = nn.Parameter(self.new_parameter(U).detach(), **frozen)  # saved, never trained directly
        self.V = nn.Parameter(self.new_parameter(Vh.T).detach(), **frozen)
        self.singular_values = self.new_parameter(S)
        index = _draw(S, rank, self.seed, self.round).to(self.U.device)
        self.register_buffer("selected", index)
        self.U_selected = self.new_parameter(U[:, index.cpu()])
        self.V_selected = self.new_parameter(Vh.T[:, index.cpu()])

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        every = kwargs.get("orthogonalize_every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise SpectrakitError(f"orthogonalize_every={every!r} must be a positive integer")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "seed": self.seed, "orthogonalize_every": self.orthogonalize_every,
                "sampling_round": self.round}

    def trainable(self) -> dict[str, nn.Parameter]:
        tensors = super().trainable()
        tensors["selected"] = cast(nn.Parameter, self.selected)  # the round's indices, saved with the rest
        return tensors

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Ũ, Ṽ``: the bases with this round's trained columns in place (differentiable)."""
        return (self.U.index_copy(1, self.selected, self.U_selected),
                self.V.index_copy(1, self.selected, self.V_selected))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.adapter_input(x)
        h = _SpectralProduct.apply(h.reshape(-1, h.shape[-1]), self.singular_values, self.U_selected,
                                   self.V_selected, self.U, self.V, self.selected).reshape(*h.shape[:-1], -1)
        bias = self.base_layer.bias
        out = h if bias is None else h + bias.to(h.dtype)
        return out.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        U, V = self.bases()
        return (U * self.singular_values) @ V.T

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().to(self.adapter_dtype)

    @torch.no_grad()
    def resample(self) -> None:
        """End a round: write back, re-orthogonalize when due, draw the next columns."""
        U, V = self.bases()
        self.round += 1
        if self.round % self.orthogonalize_every == 0:
            U64, S, Vh = linalg.svd((U * self.singular_values) @ V.T, method="exact", dtype=torch.float64)
            U, V = U64.to(U), Vh.T.to(V)
            self.singular_values.copy_(S.to(self.singular_values))
        self.U.copy_(U)
        self.V.copy_(V)
        index = _draw(self.singular_values, self.rank, self.seed, self.round).to(self.selected.device)
        self.selected.copy_(index)
        self.U_selected.copy_(self.U[:, index])
        self.V_selected.copy_(self.V[:, index])


def resample_vectors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """End an SST round in every ``sst`` layer of ``model``; returns the number of layers.

    Args:
        model: a model adapted with ``"sst"``.
        optimizer: if given, the state (moments) of the re-drawn vector parameters is cleared,
            since they now hold other columns.
    """
    layers = [layer for layer in adapted_layers(model).values() if isinstance(layer, SSTLinear)]
    if not layers:
        raise SpectrakitError("resample_vectors: the model has no 'sst' adapters")
    for layer in layers:
        layer.resample()
        if optimizer is not None:
            for param in (layer.U_selected, layer.V_selected):
                optimizer.state.pop(param, None)
    return len(layers)
