"""Lipschitz penalty from the Gram-iteration bound: a certified σ₁ per layer, kept under a target.

For each layer, ``L_l`` is the Gram-iteration upper bound on its spectral norm (Delattre,
Barthélemy, Araujo & Allauzen, *Efficient Bound of Lipschitz Constant for Convolutional
Layers by Gram Iteration*, ICML 2023) — on the ``out × in`` matrix of a dense layer, and on
the per-frequency matrices ``K̂(ω)`` of a convolution (its true operator norm, circular
padding, on the layer's input grid) with ``conv="operator"``. Unlike power iteration it never
under-estimates σ₁, so the penalty

    layer mode:    R = Σ_l max(0, L_l − τ)²
    product mode:  R = max(0, Σ_l log L_l − log τ)²        (the network's bound Π L_l vs τ)
    target=None:   R = Σ_l L_l

is zero only when the certificate holds. With 1-Lipschitz activations, ``Π_l L_l`` bounds
the Lipschitz constant of a feed-forward chain. The bound is computed in float64 by default
and is differentiable; ``n_iter`` Gram iterations overshoot σ₁ by at most ``r^{1/2^{n+1}}``.

>>> import torch, spectrakit as sk
>>> layer = torch.nn.Linear(16, 16)
>>> with torch.no_grad():
...     _ = layer.weight.copy_(0.5 * torch.linalg.qr(torch.randn(16, 16))[0])   # σ₁ = 0.5
>>> float(sk.regularize.LipschitzPenalty(layer, target=1.0)())
0.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import CONV_KINDS, Patterns, Penalty, Target
from ._operators import ConvInputShapes, operator_blocks, top_singular_value


class LipschitzPenalty(Penalty):
    """Hinge on each layer's (or the product's) Gram-iteration Lipschitz bound.

    Args:
        target: ``τ``; ``None`` penalizes ``Σ_l L_l`` itself.
        mode: ``"layer"`` or ``"product"``.
        n_iter: Gram iterations; the bound overshoots σ₁ by at most a factor ``rank^{1/2^{n_iter+1}}``.
        conv: ``"operator"`` (default; the convolution's true norm) or ``"reshape"``.
        input_shapes, example_input: conv input sizes (otherwise tracked by forward hooks).
    """

    default_kinds = ("linear", "conv1d", "conv2d", "matrix")

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], target: float | None = 1.0, *,
                 mode: str = "layer", n_iter: int = 6, conv: str = "operator",
                 input_shapes: Mapping[str, Sequence[int]] | None = None, example_input: Any = None,
                 include: Patterns = None, exclude: Patterns = None, kinds: str | Iterable[str] | None = None,
                 reduction: str = "sum") -> None:
        if mode not in ("layer", "product"):
            raise SpectrakitError(f"mode={mode!r} is not one of layer, product")
        if conv not in ("reshape", "operator"):
            raise SpectrakitError(f"conv={conv!r} is not one of reshape, operator")
        if target is not None and not target > 0:
            raise SpectrakitError(f"target={target!r} must be positive")
        if mode == "product" and target is None:
            raise SpectrakitError("mode='product' needs a target")
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        self.target, self.mode, self.n_iter, self.conv = target, mode, n_iter, conv
        self.shapes = ConvInputShapes(self.targets, input_shapes, example_input,
                                      source if isinstance(source, nn.Module) else None) if conv == "operator" else None

    def bound(self, target: Target) -> torch.Tensor:
        """The certified upper bound ``L_l`` on the layer's spectral norm (differentiable)."""
        if self.shapes is not None and target.kind in CONV_KINDS:
            X = operator_blocks(target, target.kernel(), self.shapes.get(target))
        else:
            X = target.matrix()
        return top_singular_value(X, "gram", n_iter=self.n_iter)

    def bounds(self) -> dict[str, float]:
        with torch.no_grad():
            return {t.name: float(self.bound(t)) for t in self.targets}

    def term(self, target: Target, index: int) -> torch.Tensor:
        L = self.bound(target)
        if self.mode == "product":
            return L.log()  # summed by forward into log Π L_l
        return L if self.target is None else torch.relu(L - self.target).square()

    def forward(self) -> torch.Tensor:
        if self.mode == "layer":
            return super().forward()
        if self.target is None:
            raise SpectrakitError("mode='product' needs a target")
        log_product = torch.stack([self.named_term(t, i) for i, t in enumerate(self.targets)]).sum()
        return self.checked(torch.relu(log_product - math.log(self.target)).square())

    def remove_hooks(self) -> None:
        if self.shapes is not None:
            self.shapes.remove()
