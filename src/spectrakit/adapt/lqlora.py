"""LQ-LoRA: W ≈ trainable low rank + frozen NF4-quantized residual (Guo et al., 2024; seed 002).

The decomposition alternates (``iterations`` rounds, keeping the best):

    L ← best rank-r approximation of  W − deq(Q)       (``spectrakit.linalg.svd``, exact)
    Q ← NF4(W − L)                                       (torchao's ``NF4Tensor``: 4-bit
                                                          normal-float codes, blockwise absmax
                                                          scales, double-quantized scalers)

then ``L = s·B A`` is split as in PiSSA (``√Σ`` on both factors) and

    y = x deq(Q)ᵀ + b + s · (x Aᵀ) Bᵀ.

Only ``A, B`` train and are saved; Q is recomputed from W on load (deterministic). The full
weight is dropped from the layer: its memory becomes the NF4 residual's, about
``0.53 bytes`` per entry (4-bit codes + an 8-bit scale per block + fp32 factors per scaler
block), see :meth:`LQLoRALinear.residual_bytes`.

**Not exact at initialization**: the adapted layer is ``deq(Q) + L``, within the NF4 error
of W (each entry within half the largest gap between NF4 codes, 0.139, times its block's
scale, plus the scale's own rounding). Merging writes ``deq(Q) + s·B A`` into a dense weight
again. Needs ``torchao`` (``pip install 'spectrakit[quant]'``). Trainable parameters per
layer: ``r · (in + out)``.

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "lq-lora", rank=4)  # doctest: +SKIP
>>> sk.trainable_parameters(model)                                                     # doctest: +SKIP
384
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import linalg
from ..errors import SpectrakitError
from .base import AdaptedLinear, register
from .lora import add_low_rank


def _nf4() -> Any:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    except ImportError as error:
        raise SpectrakitError("lq-lora needs torchao for its NF4 quantizer: pip install 'spectrakit[quant]'"
                              ) from error
    return NF4Tensor


def nf4_block_sizes(numel: int) -> tuple[int, int]:
    """``(block_size, scaler_block_size)`` that torchao accepts for a tensor of ``numel`` entries:
    blocks of 64 (or the largest power of two dividing ``numel``), and the largest divisor of the
    block count up to 256 for the double-quantized scalers."""
    block = 64
    while numel % block:
        block //= 2
    if block < 2:
        raise SpectrakitError(f"a tensor of {numel} entries cannot be split into NF4 blocks (odd size)")
    blocks = numel // block
    scaler = max(d for d in range(1, min(256, blocks) + 1) if blocks % d == 0)
    return block, scaler


_INNER = ("quantized_scalers", "quantization_factor", "scaler_mean", "quantized_data", "nf4")


class QuantizedResidual:
    """Holds torchao's ``NF4Tensor``: copies and device moves go through its inner tensors
    (torchao's own ``clone`` re-quantizes with default block sizes, which small layers fail)."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor
        self._pairs: torch.Tensor | None = None  # decoded (high, low) code of every byte value

    def moved(self, convert: Any) -> QuantizedResidual:
        """A new holder whose inner tensors are ``convert(t)`` (a copy, a device move)."""
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
            construct_nf4_args,
        )

        inner = {name: convert(getattr(self.tensor, name)) for name in _INNER}
        inner["device"] = inner["quantized_data"].device
        return QuantizedResidual(type(self.tensor)(*construct_nf4_args(self.tensor, inner)))

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedResidual:
        return self.moved(lambda t: t.clone())

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix, bitwise what torchao's ``get_original_weight`` returns, about 4× faster:
        one gather from a 256-row table of code pairs (a byte holds two codes) instead of
        unpacking, two gathers and an interleaving stack."""
        q = self.tensor
        table = self._pairs
        if table is None or table.device != q.nf4.device:
            byte = torch.arange(256, device=q.nf4.device)
            table = self._pairs = torch.stack([q.nf4[byte >> 4], q.nf4[byte & 0b1111]], dim=-1)
        scalers = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size)
        codes = table.index_select(0, q.quantized_data.to(torch.long))  # (bytes, 2): the interleaved pairs
        return (codes.reshape(scalers.shape[0], -1) * scalers[:, None]).reshape(q.shape)

    def nbytes(self) -> int:
        return sum(getattr(self.tensor, name).numel() * getattr(self.tensor, name).element_size()
                   for name in _INNER if name != "nf4")  # the 16-entry code table is shared


def quantize_nf4(matrix: torch.Tensor) -> Any:
    """torchao's NF4 tensor of ``matrix`` (float32, contiguous)."""
    block, scaler = nf4_block_sizes(matrix.numel())
    return _nf4().from_tensor(matrix.float().contiguous(), block, scaler)


def lq_decompose(weight: torch.Tensor, rank: int,
                 iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``(U_r, S_r, Vh_r, Q)`` with ``U_r diag(S_r) Vh_r + deq(Q) ≈ weight``, the best of ``iterations``.

    Args:
        weight: the ``out × in`` matrix (float32).
        rank: the low-rank part's rank.
        iterations: alternating rounds.
    """
    best: tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] | None = None
    dequantized = torch.zeros_like(weight)
    for _ in range(iterations):
        U, S, Vh = linalg.svd(weight - dequantized, k=rank, method="exact")
        low_rank = (U * S) @ Vh
        quantized = quantize_nf4(weight - low_rank)
        dequantized = quantized.get_original_weight().to(weight.dtype)
        error = float((weight - low_rank - dequantized).norm())
        if best is None or error < best[0]:
            best = (error, (U, S, Vh, quantized))
    assert best is not None
    return best[1]


class _ResidualProduct(torch.autograd.Function):
    """``x deq(Q)ᵀ`` that keeps no dense weight between forward and backward: the backward
    dequantizes again (as QLoRA does), so a training step holds one layer's dense residual
    at a time, not every layer's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, residual: QuantizedResidual) -> torch.Tensor:
        ctx.residual = residual
        return x @ residual.dequantize().to(x).T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return g @ ctx.residual.dequantize().to(g), None


@register
class LQLoRALinear(AdaptedLinear):
    method = "lq-lora"
    options = ("alpha", "iterations")
    rewrites_base = True
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", alpha: float | None = None,
                 iterations: int = 5, init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        _nf4()
        self.alpha, self.iterations = float(rank if alpha is None else alpha), int(iterations)
        self.scaling = self.alpha / rank
        weight = self.base_weight().detach().float()
        U, S, Vh, quantized = lq_decompose(weight, rank, self.iterations)
        self.residual = QuantizedResidual(quantized)
        root = (S / self.scaling).sqrt()
        self.lora_A = self.new_parameter(root[:, None] * Vh)
        self.lora_B = self.new_parameter(U * root)
        # the dense weight goes: the layer now holds only the NF4 residual (and its bias)
        stored = self.base_layer.weight
        self.stored_shape, self.stored_dtype = tuple(stored.shape), stored.dtype
        stored.data = torch.empty(0, dtype=stored.dtype, device=stored.device)

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        super().check_layer(name, out_features, in_features, kwargs)
        iterations = kwargs.get("iterations", 5)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise SpectrakitError(f"iterations={iterations!r} must be a positive integer")
        if (out_features * in_features) % 2:
            raise SpectrakitError(f"layer {name} ({out_features}×{in_features}) has an odd number of entries; "
                                  "NF4 packs two per byte")

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "iterations": self.iterations}

    def residual_weight(self) -> torch.Tensor:
        """``deq(Q)``, ``out × in``, float32, on the adapter's device."""
        return self.residual.dequantize().to(device=self.lora_A.device, dtype=self.adapter_dtype)

    def residual_bytes(self) -> int:
        """Bytes the frozen residual really occupies (codes, scalers, their factors and mean)."""
        return self.residual.nbytes()

    def _apply(self, fn: Any, recurse: bool = True) -> LQLoRALinear:
        super()._apply(fn, recurse)
        device = self.lora_A.device  # follow the parameters' device; the codes keep their dtypes
        if self.residual.tensor.quantized_data.device != device:
            self.residual = self.residual.moved(lambda t: t.to(device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.adapter_input(x)
        flat = h.reshape(-1, h.shape[-1])
        base = _ResidualProduct.apply(flat, self.residual)
        bias = self.base_layer.bias
        if bias is not None:
            base = base + bias.to(base.dtype)
        out = add_low_rank(base, flat, self.lora_A.T, self.lora_B.T, self.scaling)
        return out.reshape(*h.shape[:-1], -1).to(x.dtype)

    def base_weight(self) -> torch.Tensor:
        if self.base_layer.weight.numel() == 0:  # after __init__: the quantized residual stands in for W
            return self.residual_weight().to(self.stored_dtype)
        return super().base_weight()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        return self.residual_weight() + self.delta_weight()

    def restore(self) -> nn.Module:
        merged = self.merged_weight().detach()
        stored = merged.T if self.fan_in_fan_out else merged
        self.base_layer.weight.data = stored.to(self.stored_dtype).contiguous()
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, True))
        return self.base_layer
