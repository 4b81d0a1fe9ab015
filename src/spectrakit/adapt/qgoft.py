"""qGOFT: orthogonal fine-tuning by O(d) Givens rotations (Ma et al., 2024).

The input basis of W is rotated by ``r`` sweeps of Givens rotations, each sweep a
brick wall of two parallel layers (pairs ``(0,1), (2,3), …`` then ``(1,2), (3,4), …``):
``d − 1`` rotations per sweep, ``d = in``, applied in O(d) work per token:

    W' = W G,   G = ∏_{sweeps} L_odd L_even,   L = ⊕ [[c, −s], [s, c]] on its pairs,
    y  = (x Gᵀ) Wᵀ + b.

``quasi=True`` (default, the paper's quasi-Givens form) trains ``c`` and ``s`` freely,
starting at ``(1, 0)``, so each block may also rescale its plane; the soft orthogonality
regularizer ``Σ (c² + s² − 1)²`` is returned by :func:`spectrakit.adapter_penalty`.
``quasi=False`` trains one angle per rotation (``c = cos θ``, ``s = sin θ``, ``θ = 0``),
and ``G`` is exactly orthogonal. Either way ``G = I`` at initialization.
Trainable parameters per layer: ``2 · r · (in − 1)`` (quasi) or ``r · (in − 1)``.
The chain of ``2r`` dependent layers is applied one after another, so a step costs
more than LoRA's two matmuls when ``r`` is large (see ``BENCHMARKS.md``).

>>> import torch, spectrakit as sk
>>> model = sk.adapt(torch.nn.Sequential(torch.nn.Linear(64, 32)), "qgoft", rank=2, quasi=False)
>>> sk.trainable_parameters(model)
126
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AdaptedLinear, register


class _PairRotation(torch.autograd.Function):
    """``y = scale ⊙ h + shear ⊙ h[:, partner]`` on 2-D ``h`` with a hand-written backward.

    Autograd's version spends a scatter on the gather's backward and a separate product for
    each of the two coefficient gradients; here ``partner`` being an involution gives
    ``∂h = scale ⊙ g + shear[partner] ⊙ g[:, partner]`` (a gather, not a scatter) and the shear
    gradient reuses the same gathered ``g``.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
                partner: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, scale, shear, partner)
        return torch.addcmul(h * scale, h.index_select(-1, partner), shear)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, scale, shear, partner = ctx.saved_tensors
        need_h, need_scale, need_shear = ctx.needs_input_grad[:3]
        swapped = g.index_select(-1, partner)
        grad_h = torch.addcmul(g * scale, swapped, shear.index_select(0, partner)) if need_h else None
        grad_scale = (g * h).sum(0) if need_scale else None
        grad_shear = (swapped * h).sum(0).index_select(0, partner) if need_shear else None
        return grad_h, grad_scale, grad_shear, None


def _rotate_pairs(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor, offset: int,
                  partner: torch.Tensor) -> torch.Tensor:
    """Apply the 2×2 blocks ``[[c, −s], [s, c]]`` to coordinates ``(offset + 2k, offset + 2k + 1)`` of 2-D ``h``.

    As one elementwise pass, ``C ⊙ h + S ⊙ h[partner]``, with ``partner`` swapping each pair's
    two coordinates (slicing and re-interleaving the pairs costs several copies instead).
    """
    d, pairs = h.shape[-1], c.shape[0]
    first = torch.arange(offset, offset + 2 * pairs, 2, device=h.device)
    scale = torch.ones(d, dtype=c.dtype, device=c.device).index_put((first,), c).index_put((first + 1,), c)
    shear = torch.zeros(d, dtype=s.dtype, device=s.device).index_put((first,), -s).index_put((first + 1,), s)
    return _PairRotation.apply(h, scale, shear, partner)


def _partner(d: int, offset: int) -> torch.Tensor:
    """The permutation that swaps the coordinates of each pair ``(offset + 2k, offset + 2k + 1)``."""
    index = torch.arange(d)
    pairs = (d - offset) // 2
    first = torch.arange(offset, offset + 2 * pairs, 2)
    index[first], index[first + 1] = first + 1, first
    return index


@register
class QGOFTLinear(AdaptedLinear):
    method = "qgoft"
    options = ("quasi",)
    partner_even: torch.Tensor
    partner_odd: torch.Tensor

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "", quasi: bool = True,
                 init: dict[str, Any] | None = None) -> None:
        super().__init__(base_layer, rank, name=name)
        self.quasi = bool(quasi)
        d = self.in_features
        self.even_pairs, self.odd_pairs = d // 2, (d - 1) // 2
        device = self.base_layer.weight.device
        self.register_buffer("partner_even", _partner(d, 0).to(device), persistent=False)
        self.register_buffer("partner_odd", _partner(d, 1).to(device), persistent=False)
        rotations = rank * (d - 1)
        if self.quasi:
            self.cosines = self.new_parameter(torch.ones(rotations))
            self.sines = self.new_parameter(torch.zeros(rotations))
        else:
            self.angles = self.new_parameter(torch.zeros(rotations))

    @property
    def lora_device(self) -> torch.device:
        return self.cosines.device if self.quasi else self.angles.device

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quasi:
            return self.cosines, self.sines
        return torch.cos(self.angles), torch.sin(self.angles)

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(c, s, offset)`` of each parallel layer, in the order ``G = L₁ L₂ ⋯`` multiplies them."""
        c, s = self._blocks()
        layers, start = [], 0
        for _ in range(self.rank):
            for pairs, offset in ((self.even_pairs, 0), (self.odd_pairs, 1)):
                layers.append((c[start:start + pairs], s[start:start + pairs], offset))
                start += pairs
        return layers

    def rotate(self, h: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``h Gᵀ`` (each row ``v`` becomes ``G v``), or ``h G`` with ``transpose=True``."""
        layers = self._layers()
        shape = h.shape
        h = h.reshape(-1, shape[-1])  # a gather along the last dim of a 3-D tensor is ~10× slower than of 2-D
        if transpose:  # v ↦ Gᵀ v = L_mᵀ ⋯ L₁ᵀ v: L₁ᵀ first, each block's sine negated
            for c, s, offset in layers:
                h = _rotate_pairs(h, c, -s, offset, self.partner_odd if offset else self.partner_even)
        else:  # v ↦ G v = L₁ ⋯ L_m v: the last layer first
            for c, s, offset in reversed(layers):
                h = _rotate_pairs(h, c, s, offset, self.partner_odd if offset else self.partner_even)
        return h.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.rotate(self.adapter_input(x)).to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        # row w of W becomes w G = (Gᵀ wᵀ)ᵀ
        return self.rotate(self.base_weight().to(self.adapter_dtype), transpose=True)

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().to(self.adapter_dtype)

    def rotation(self) -> torch.Tensor:
        """``G`` itself (``in × in``), for inspection and tests."""
        eye = torch.eye(self.in_features, dtype=self.adapter_dtype, device=self.lora_device)
        return self.rotate(eye, transpose=True)  # rows of I G are the rows of G

    def penalty(self) -> torch.Tensor | None:
        if not self.quasi:
            return None
        return ((self.cosines ** 2 + self.sines ** 2 - 1.0) ** 2).sum()
