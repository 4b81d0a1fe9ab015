r"""Grokfast: amplify the slow part of the gradients (an EMA low-pass filter).

Between ``backward()`` and the optimizer's ``step()``, each parameter's gradient ``g_t``
is replaced by itself plus ``λ`` times its exponential moving average (Lee et al., 2024):

    μ_t = α·μ_{t−1} + (1 − α)·g_t      (μ_0 = g_1)
    g_t ← g_t + λ·μ_t

so the slowly varying component, which the paper links to generalization, is amplified
by about ``1 + λ`` and the fast one left as is. It works with any optimizer.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Linear(4, 2)
>>> opt, grokfast = torch.optim.AdamW(model.parameters()), sk.optimize.Grokfast(model)
>>> model(torch.randn(3, 4)).sum().backward()
>>> grokfast()            # filter the gradients in place
>>> opt.step()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError


class Grokfast:
    """The EMA gradient filter (see the module docstring for the formula).

    Args:
        model: the module whose parameters' gradients are filtered (or an iterable of
            ``(name, parameter)`` pairs).
        alpha: ``α`` in ``[0, 1)``, the EMA's momentum.
        lamb: ``λ ≥ 0``, the amplification.
    """

    def __init__(self, model: nn.Module | Any, alpha: float = 0.98, lamb: float = 2.0) -> None:
        if not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
            raise SpectrakitError(f"Grokfast: alpha={alpha!r} must lie in [0, 1)")
        if not isinstance(lamb, (int, float)) or lamb < 0:
            raise SpectrakitError(f"Grokfast: lamb={lamb!r} must be ≥ 0")
        named = model.named_parameters() if isinstance(model, nn.Module) else model
        self.parameters = {name: param for name, param in named if param.requires_grad}
        self.alpha = float(alpha)
        self.lamb = float(lamb)
        self.averages: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self) -> None:
        """Filter every gradient in place (call after ``backward()``, before ``step()``)."""
        for name, param in self.parameters.items():
            if param.grad is None:
                continue
            average = self.averages.get(name)
            if average is None:
                self.averages[name] = average = param.grad.detach().clone()
            else:
                average.lerp_(param.grad, 1 - self.alpha)
            param.grad.add_(average, alpha=self.lamb)

    def state_dict(self) -> dict[str, Any]:
        """The EMAs and settings, for checkpoints (tensors only; ``torch.save``-able)."""
        return {"alpha": self.alpha, "lamb": self.lamb, "averages": {k: v.clone() for k, v in self.averages.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Args:
            state: a dict from :meth:`state_dict`.
        """
        unknown = set(state["averages"]) - set(self.parameters)
        if unknown:
            raise SpectrakitError(f"Grokfast.load_state_dict: {sorted(unknown)[0]} is not a parameter of this model")
        self.alpha, self.lamb = float(state["alpha"]), float(state["lamb"])
        self.averages = {k: v.detach().clone().to(self.parameters[k].device) for k, v in state["averages"].items()}
