r"""SAM: sharpness-aware minimization, and ASAM (its scale-invariant form).

Each step takes two gradients (Foret et al., 2021). With ``g = ∇L(w)``:

    SAM:   ε = ρ · g / ‖g‖₂
    ASAM:  ε = ρ · T² g / ‖T g‖₂,   T = diag(|w| + η)      (Kwon et al., 2021)
    w ← base_step(w, ∇L(w + ε))

the norm taken over all parameters together. ``step(closure)`` runs both passes: the
closure must zero the gradients, compute the loss and call ``backward()``.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Linear(4, 1)
>>> opt = sk.optimize.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
>>> x, y = torch.randn(8, 4), torch.randn(8, 1)
>>> def closure():
...     opt.zero_grad()
...     loss = (model(x) - y).square().mean()
...     loss.backward()
...     return loss
>>> loss = opt.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import SpectrakitError
from ._base import check_nonnegative


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer.

    Args:
        params: parameters or param groups.
        base_optimizer: the base optimizer's class (``torch.optim.SGD``, ``spectrakit.optimize.Muon``, …);
            it is built on the same param groups.
        rho: ``ρ``, the radius of the perturbation (≥ 0).
        adaptive: ASAM instead of SAM.
        eta: ``η`` of ASAM's ``T = |w| + η``.
        **options: the base optimizer's options (``lr=``, ``momentum=``, …).
    """

    def __init__(self, params: Iterable[Any], base_optimizer: Callable[..., torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, **options: Any) -> None:
        check_nonnegative("rho", rho, "SAM")
        check_nonnegative("eta", eta, "SAM")
        if "lr" in options:
            check_nonnegative("lr", options["lr"], "SAM")
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta, **options})
        self.base_optimizer = base_optimizer(self.param_groups, **options)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def perturbation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, ε)`` for every parameter with a gradient (the formula above)."""
        scaled = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                T = param.abs() + group["eta"] if group["adaptive"] else None
                scaled.append((group, param, T))
        if not scaled:
            return []
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(param.grad * T if T is not None else param.grad) for _, param, T in scaled]))
        if not bool(torch.isfinite(norm)):
            raise SpectrakitError("SAM: the gradient holds NaN or Inf; lower the learning rate")
        result = []
        for group, param, T in scaled:
            factor = group["rho"] / norm.clamp_min(1e-12)
            epsilon = param.grad * (T * T if T is not None else 1.0) * factor
            result.append((param, epsilon))
        return result

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Both passes and the base optimizer's step.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward()`` and
                returns the loss (required).
        """
        if closure is None:
            raise SpectrakitError("SAM.step needs a closure that zeroes the gradients, computes the loss and "
                                  "calls backward()")
        with torch.enable_grad():
            loss = closure()
        perturbed = self.perturbation()
        with torch.no_grad():
            for param, epsilon in perturbed:
                param.add_(epsilon)
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for param, epsilon in perturbed:
                param.sub_(epsilon)
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM itself keeps none between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer's state.

        Args:
            state_dict: from :meth:`state_dict`.
        """
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
