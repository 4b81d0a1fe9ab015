"""What every matrix optimizer in :mod:`spectrakit.optimize` shares.

- Checks, one line each: a negative learning rate or weight decay, a parameter that is
  not a matrix (pointing to :func:`spectrakit.optimize.for_model`), a NaN/Inf gradient
  (naming the parameter).
- Param groups marked ``adamw=True`` are stepped by AdamW (``torch.optim``'s own
  functional update), so :func:`~spectrakit.optimize.for_model` can hand a whole model to
  *one* optimizer object: one ``state_dict``, one ``zero_grad``, one thing for a
  ``GradScaler`` or an LR scheduler to hold.
- A conv kernel ``(out, in, *k)`` is treated as the ``out × (in·k…)`` matrix.

A subclass implements :meth:`MatrixOptimizer.matrix_step` for its matrix groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.optim.adam import adam

from ..errors import NonFiniteError, SpectrakitError

#: AdamW settings of the ``adamw=True`` groups when the group does not set them.
ADAMW_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


def check_nonnegative(name: str, value: Any, owner: str) -> None:
    """Refuse a negative or non-finite number for option ``name`` of ``owner``."""
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SpectrakitError(f"{owner}: {name}={value!r} must be a finite number ≥ 0")


def check_fraction(name: str, value: Any, owner: str) -> None:
    """Refuse ``value`` outside ``[0, 1)`` for option ``name`` (a momentum or beta)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise SpectrakitError(f"{owner}: {name}={value!r} must lie in [0, 1)")


def check_count(name: str, value: Any, owner: str, minimum: int = 1) -> None:
    """Refuse a non-integer or an integer below ``minimum`` for option ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpectrakitError(f"{owner}: {name}={value!r} must be an integer ≥ {minimum}")


def as_matrix_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``out × rest`` (a conv kernel flattened), a view where possible."""
    return tensor.reshape(tensor.shape[0], -1)


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the matrix optimizers: validation, AdamW groups, gradient checks.

    Args:
        params: parameters, named parameters or param groups, as for any
            ``torch.optim.Optimizer``; a group with ``adamw=True`` is stepped by AdamW
            (its ``lr``, ``betas``, ``eps``, ``weight_decay``).
        defaults: the subclass's defaults (must hold ``lr``).
        distributed: spread per-matrix work over the ranks of ``process_group`` when
            ``torch.distributed`` is initialized (see :mod:`._distributed`).
        process_group: the group to spread over (default: the world).
        check_finite: refuse NaN/Inf gradients with an error naming the parameter (one
            reduction and one host sync per step).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, distributed: bool = True,
                 process_group: object | None = None, check_finite: bool = True) -> None:
        self.distributed = distributed
        self.process_group = process_group
        self.check_finite = check_finite
        self.routes: list[Any] | None = None  # set by for_model
        super().__init__(params, defaults)

    def describe(self) -> str:
        """Which parameter goes where: per destination, its learning rate and parameters."""
        if self.routes is not None:
            from .routing import describe_routes

            return describe_routes(self.routes, self.param_groups)
        lines = []
        for index, group in enumerate(self.param_groups):
            kind = "adamw" if group.get("adamw") else self.method.lower()
            count = sum(p.numel() for p in group["params"])
            lines.append(f"group {index}: {kind} (lr {group['lr']:g}): {len(group['params'])} tensors, "
                         f"{count:,} parameters")
        return "\n".join(lines)

    # -- validation -------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The optimizer's name, for messages."""
        return type(self).__name__

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (checked: options, and matrices only unless ``adamw=True``).

        Args:
            param_group: ``{"params": ..., **options}`` as for ``torch.optim.Optimizer``.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        if group.get("adamw"):
            for key, value in ADAMW_DEFAULTS.items():
                group.setdefault(key, value)
        check_nonnegative("lr", group["lr"], self.method)
        check_nonnegative("weight_decay", group.get("weight_decay", 0.0), self.method)
        self.check_group(group)
        if group.get("adamw"):
            return
        for position, param in enumerate(group["params"]):
            if param.ndim < 2:
                raise SpectrakitError(
                    f"{self.param_name(group, position, index)}: {self.method} works on matrices, and this "
                    f"parameter has shape {tuple(param.shape)}; use spectrakit.optimize.for_model(model, "
                    f"{self.method.lower()!r}) to send biases, norms and embeddings to AdamW")

    def check_group(self, group: dict[str, Any]) -> None:
        """Subclass hook: refuse a group's bad options with one line."""

    def param_name(self, group: dict[str, Any], position: int, index: int | None = None) -> str:
        """A parameter's name: from ``param_names`` when the optimizer got named parameters."""
        names = group.get("param_names")
        if names:
            return str(names[position])
        if index is None:
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{index}].params[{position}]"

    def named_grads(self, group: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, param, grad)`` for each parameter of ``group`` that has a gradient."""
        for position, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise SpectrakitError(f"{self.param_name(group, position)}: {self.method} "
                                      "does not take sparse gradients")
            yield self.param_name(group, position), param, param.grad

    def _check_gradients(self) -> None:
        if not self.check_finite:
            return
        found = [(group, position, param.grad) for group in self.param_groups
                 for position, param in enumerate(group["params"]) if param.grad is not None]
        if not found:
            return
        # A NaN or Inf anywhere makes the tensor's sum non-finite; the sum is one cheap pass
        # (the max-abs norm costs about ten times as much on the CPU), and a finite gradient's sum
        # overflows float32 only if its entries are near 1e38 / numel.
        sums = torch.stack([grad.sum(dtype=torch.float32) for _, _, grad in found])
        finite = torch.isfinite(sums)
        if bool(finite.all()):
            return
        group, position, _ = found[int((~finite).nonzero()[0])]
        raise NonFiniteError(
            f"{self.param_name(group, position)}: the gradient holds NaN or Inf; lower the learning rate, "
            "or train with torch.amp.GradScaler, which skips such steps before they reach the optimizer")

    # -- stepping ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        matrix_groups = []
        for group in self.param_groups:
            if group.get("adamw"):
                self._adamw_step(group)
            else:
                matrix_groups.append(group)
        self.matrix_step(matrix_groups)
        return loss

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Subclass hook: update the parameters of the matrix ``groups``."""
        raise NotImplementedError

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for _, param, grad in self.named_grads(group):
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False, decoupled_weight_decay=True,
             amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=False)
