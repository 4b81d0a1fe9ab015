"""Orthonormality and modulation: train a deep plain network from an orthonormal start, kept there.

Xie, Xiong & Pu, *All You Need is Beyond a Good Init: Exploring Better Solution for Training
Extremely Deep Convolutional Neural Networks with Orthonormality and Modulation*, CVPR 2017.
Two ingredients against vanishing or exploding backpropagated errors in nets without shortcuts:

1. **Orthonormality.** Every filter bank starts orthonormal (``nn.init.orthogonal_`` on the
   ``out × in·k…`` matrix) and a penalty keeps it near there while training,

   .. math::  R(W) = λ \\sum_l \\|W_l W_l^T - I\\|_F^2

   over the rows (filters) of each layer — spectrakit's ``SoftOrthogonality(mode="so")``, which
   takes the smaller Gram matrix, so a layer with more filters than inputs is held to
   orthonormal columns instead.
2. **Backward error modulation.** Under the quasi-isometry assumption between consecutive
   parametric layers, the error that leaves a layer backwards should be as large as the one that
   entered it. Each modulated layer rescales the gradient it passes to its input:

   .. math::  δ_{\\mathrm{in}} \\leftarrow δ_{\\mathrm{in}} \\cdot
              \\frac{\\|δ_{\\mathrm{out}}\\|}{\\|δ_{\\mathrm{in}}\\|}

   (per batch, clipped to ``[1/max_gain, max_gain]``), so the errors reaching the first
   layers keep the size of the loss's gradient. The parameters' own gradients are left alone;
   only what flows further down is modulated.

:func:`orthonormal_modulation` does all three steps on a model and returns the penalty and the
hooks' handle.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
>>> penalty, handle = sk.regularize.orthonormal_modulation(model)
>>> float(penalty()) < 1e-10      # orthonormal at the start
True
>>> model(torch.randn(4, 16)).sum().backward()
>>> handle.remove()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import Patterns, select_matrices
from .orthogonality import SoftOrthogonality

MODULATED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@torch.no_grad()
def orthonormal_init_(model: nn.Module, *, include: Patterns = None, exclude: Patterns = None,
                      kinds: str | Iterable[str] | None = ("linear", "conv1d", "conv2d")) -> nn.Module:
    """Make every selected weight (semi-)orthogonal as an ``out × in·k…`` matrix; returns ``model``.

    Args:
        model: the model.
        include, exclude, kinds: which weights, as for the penalties.
    """
    chosen = [kinds] if isinstance(kinds, str) else kinds
    for target in select_matrices(model, include, exclude, chosen, "orthonormal_init_"):
        weight = getattr(target.module, target.attr)
        nn.init.orthogonal_(weight)
    return model


class ModulationHandle:
    """The backward hooks of :class:`BackwardModulation`; ``remove()`` detaches them all."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def backward_modulation(model: nn.Module, *, max_gain: float = 10.0,
                        layers: Iterable[nn.Module] | None = None) -> ModulationHandle:
    """Rescale the error each Linear/Conv layer sends backwards to the norm of the one it received.

    Args:
        model: the model whose layers are modulated (every Linear, Conv1d, Conv2d unless ``layers``).
        max_gain: the largest factor (and ``1/max_gain`` the smallest) a layer may apply.
        layers: the modules to modulate instead of every parametric one.
    """
    if not max_gain >= 1:
        raise SpectrakitError(f"max_gain={max_gain!r} must be ≥ 1")
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, MODULATED)]
    if not chosen:
        raise SpectrakitError("backward_modulation: the model has no Linear or Conv layer to modulate")

    def hook(module: nn.Module, grad_input: tuple[torch.Tensor | None, ...],
             grad_output: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...] | None:
        incoming, outgoing = grad_output[0], grad_input[0]
        if incoming is None or outgoing is None:
            return None
        norm_in, norm_out = incoming.norm(), outgoing.norm()
        gain = (norm_in / norm_out.clamp_min(torch.finfo(norm_out.dtype).tiny)).clamp(1 / max_gain, max_gain)
        return (outgoing * gain, *grad_input[1:])

    return ModulationHandle([m.register_full_backward_hook(hook) for m in chosen])


def orthonormal_modulation(model: nn.Module, *, max_gain: float = 10.0, include: Patterns = None,
                           exclude: Patterns = None) -> tuple[SoftOrthogonality, ModulationHandle]:
    """Orthonormal initialization, the orthonormality penalty and backward modulation on ``model``.

    Returns ``(penalty, handle)``: add ``λ · penalty()`` to the loss; ``handle.remove()`` ends
    the modulation.

    Args:
        model: the model (changed in place: its weights are re-initialized).
        max_gain: see :func:`backward_modulation`.
        include, exclude: which weights, as for the penalties.
    """
    kinds = ("linear", "conv1d", "conv2d")
    orthonormal_init_(model, include=include, exclude=exclude, kinds=kinds)
    penalty = SoftOrthogonality(model, "so", include=include, exclude=exclude, kinds=kinds)
    return penalty, backward_modulation(model, max_gain=max_gain)
