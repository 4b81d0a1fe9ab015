"""Parametrizations on ``torch.nn.utils.parametrize``: spectral and weight normalization, learnable multipliers.

Each function registers a parametrization on ``module.<name>`` and returns the module; the
layer then computes its weight from trainable ``original`` tensors at every access.
:func:`remove_parametrizations` bakes the current weight in, so the model's outputs do
not change.

* :func:`spectral_normalize` — ``W ← τ · W / σ₁(W)`` (Miyato et al., 2018). σ₁ comes from a
  persistent :class:`spectrakit.linalg.PowerIteration` whose vectors advance ``n_iter`` steps
  per forward pass in training mode (a forward pre-hook), so reading the weight twice gives
  the same value and eval mode is deterministic. For a convolution, ``exact_conv=True``
  divides by the norm of the convolution *operator* (circular padding, on the input grid
  seen by the last forward pass or given as ``input_shape``) instead of the reshaped
  kernel's σ₁, which can be off either way.
* :func:`weight_normalize` — ``W ← g · v / ‖v‖`` per output neuron (Salimans & Kingma, 2016).
* :func:`learnable_multipliers` — ``W ← s ⊙ W`` with a trainable scalar, per-row (output)
  or per-column (input) ``s`` starting at 1, so the model is unchanged at registration.

>>> import torch, spectrakit as sk
>>> layer = sk.regularize.spectral_normalize(torch.nn.Linear(32, 16), target=2.0)
>>> bool(torch.isclose(torch.linalg.matrix_norm(layer.weight, 2), torch.tensor(2.0), rtol=1e-4))
True
>>> x = torch.randn(4, 32); before = layer(x)
>>> layer = sk.regularize.remove_parametrizations(layer)
>>> torch.equal(layer(x), before)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ..errors import SpectrakitError
from ..linalg import PowerIteration
from ..weights import iter_matrices
from ._base import CONV_KINDS, Target, _is_hf_conv1d, check_tensor
from ._operators import PROVISIONAL_GRID, operator_blocks, top_singular_value, warm_up

WARMUP_ITERS = 50  # per convergence check


def _target_of(module: nn.Module, name: str, verb: str) -> Target:
    """The module's ``name`` tensor described as a penalty target (kind, orientation)."""
    if not isinstance(module, nn.Module):
        raise SpectrakitError(f"{verb}: expected an nn.Module, got {type(module).__name__}")
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        raise SpectrakitError(f"{verb}: {type(module).__name__} has no tensor {name!r}")
    if tensor.ndim < 2:
        raise SpectrakitError(f"{verb}: parameter {name!r} of shape {tuple(tensor.shape)} is not a matrix")
    check_tensor(name, tensor, verb)
    kinds = {r.name: r.kind for r in iter_matrices(module)}
    kind = kinds.get(name, "matrix")
    return Target(name, kind, module=module, attr=name, transposed=kind == "linear" and _is_hf_conv1d(module))


def _parametrizations(module: nn.Module, name: str) -> nn.ModuleList:
    """``module.parametrizations[name]``: torch adds that ModuleDict of lists at run time."""
    return cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[name])


def _output_axis(target: Target) -> int:
    return 1 if target.transposed else 0


class SpectralNormalization(nn.Module):
    """``W ↦ τ · W / σ₁(W)``; σ₁ of the matrix, or of the conv operator with ``exact_conv``."""

    hook_handle: RemovableHandle  # the forward pre-hook spectral_normalize adds beside it

    def __init__(self, target: Target, scale: float, exact_conv: bool, method: str, n_iter: int,
                 input_shape: Sequence[int] | None, seed: int) -> None:
        super().__init__()
        self.layer, self.scale, self.method, self.n_iter = target, scale, method, n_iter
        self.exact_conv = exact_conv and target.kind in CONV_KINDS
        spatial = target.value().ndim - 2
        self.input_shape = tuple(int(s) for s in input_shape)[-spatial:] if input_shape is not None else None
        # n_iter=0: reading the weight never moves the vectors; the forward pre-hook does.
        self.state = PowerIteration(0, seed=seed)
        # The input of the last forward (detached). When this parametrization is the first on
        # the tensor it shares storage with ``original``, so the optimizer's in-place update
        # shows through; after another parametrization it lags by one step, harmless for tracking.
        self.last_input: torch.Tensor | None = None

    def grid(self, kernel: torch.Tensor) -> tuple[int, ...]:
        if self.input_shape is not None:
            return self.input_shape
        return tuple(max(PROVISIONAL_GRID, k) for k in kernel.shape[2:])

    def operand(self, W: torch.Tensor) -> torch.Tensor:
        if self.exact_conv:
            return operator_blocks(self.layer, W, self.grid(W))
        return W.reshape(W.shape[0], -1)  # σ₁ does not depend on the orientation

    def sigma(self, W: torch.Tensor) -> torch.Tensor:
        X = self.operand(W)
        # vectors sized for X were warmed up, and in training checked for zeros by advance()
        if self.method == "power" and not self.state.sized_for(X):
            warm_up(self.state, X, WARMUP_ITERS)
        return top_singular_value(X, self.method, self.state)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        self.last_input = W.detach()
        sigma = self.sigma(W).clamp_min(torch.finfo(W.dtype).tiny)
        if self.scale != 1.0:  # W / (σ/τ): tensor-by-float arithmetic, no reflected division
            sigma = sigma * (1 / self.scale)
        return W / (sigma if sigma.dtype == W.dtype else sigma.to(W.dtype))

    def advance(self, W: torch.Tensor) -> None:
        """Move the power iteration ``n_iter`` steps on the current weight (no gradient)."""
        if self.method != "power" or self.n_iter == 0:
            return
        X = self.operand(W.detach())
        warm_up(self.state, X, WARMUP_ITERS)
        self.state.step(X, self.n_iter)  # the steps alone: σ is read in forward

    def extra_repr(self) -> str:
        return (f"target={self.scale}, method={self.method!r}, exact_conv={self.exact_conv}, "
                f"input_shape={self.input_shape}")


def _pre_hook(parametrization: SpectralNormalization, name: str) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        if not parametrize.is_parametrized(module, name) or \
                not any(p is parametrization for p in _parametrizations(module, name)):
            return  # removed with torch's own remove_parametrizations: nothing to do
        W = parametrization.last_input
        if W is None:
            return
        if parametrization.exact_conv and args and isinstance(args[0], torch.Tensor):
            # a new grid re-warms the vectors (their shape changes)
            parametrization.input_shape = tuple(args[0].shape[-(W.ndim - 2):])
        if module.training:
            parametrization.advance(W)
    return hook


def spectral_normalize(module: nn.Module, target: float = 1.0, exact_conv: bool = False, *, name: str = "weight",
                       method: str = "power", n_iter: int = 1, input_shape: Sequence[int] | None = None,
                       seed: int = 0) -> nn.Module:
    """Register ``W ← target · W / σ₁(W)`` on ``module.<name>``; returns ``module``.

    Args:
        module: the layer to parametrize (in place).
        name: the parameter to normalize (default ``weight``).
        n_iter: power iterations per training forward.
        input_shape: the conv layer's input grid, for ``exact_conv``.
        seed: seed of the power iteration's starting vectors.
        target: the spectral norm the layer is given.
        exact_conv: for Conv1d/Conv2d, use the operator norm of the circular convolution on
            the input grid (``input_shape``, else the last forward pass's, else a
            32-per-axis grid until the first forward) instead of the reshaped kernel's σ₁.
        method: ``"power"`` (persistent vectors, ``n_iter`` steps per training forward) or
            ``"exact"`` (an SVD at every access).
    """
    layer = _target_of(module, name, "spectral_normalize")
    if method not in ("power", "exact"):
        raise SpectrakitError(f"method={method!r} is not one of power, exact")
    if not target > 0:
        raise SpectrakitError(f"target={target!r} must be positive")
    parametrization = SpectralNormalization(layer, float(target), exact_conv, method, n_iter, input_shape, seed)
    parametrize.register_parametrization(module, name, parametrization)
    handle = module.register_forward_pre_hook(_pre_hook(parametrization, name))
    parametrization.hook_handle = handle
    return module


class WeightNormalization(nn.Module):
    """``(g, v) ↦ g · v / ‖v‖``, the norm taken per output neuron."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(v.ndim) if d != self.axis]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel, the one its own weight_norm uses: one pass forward and one
        # backward, where the same formula in separate operators costs a quarter of a small
        # model's training step
        return torch._weight_norm(v, g, self.axis)

    def right_inverse(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.norm(W)
        # a zero neuron would make v/‖v‖ = 0/0: any direction does, since its g = 0
        return g, torch.where(g == 0, torch.ones_like(W), W)


def weight_normalize(module: nn.Module, *, name: str = "weight", dim: int | None = None) -> nn.Module:
    """Register ``W ← g · v / ‖v‖`` (trainable ``original0 = g``, ``original1 = v``); returns ``module``.

    ``dim`` is the stored axis that indexes output neurons (default: 0, or 1 for a
    transformers ``Conv1D``, whose weight is stored ``in × out``).

    Args:
        module: the layer to parametrize (in place).
        name: the parameter to reparametrize (default ``weight``).
        dim: the stored axis that indexes output neurons (see above).
    """
    layer = _target_of(module, name, "weight_normalize")
    axis = _output_axis(layer) if dim is None else dim
    if not -layer.value().ndim <= axis < layer.value().ndim:
        raise SpectrakitError(f"weight_normalize: dim={dim} is out of range for {name!r} of shape "
                              f"{tuple(layer.value().shape)}")
    parametrize.register_parametrization(module, name, WeightNormalization(axis % layer.value().ndim))
    return module


class LearnableMultipliers(nn.Module):
    """``W ↦ s ⊙ W`` with a trainable ``s`` (scalar, one per row or one per column), initially 1."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.scale = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.scale

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, shape={tuple(self.scale.shape)}"


def learnable_multipliers(module: nn.Module, mode: str = "scalar", *, name: str = "weight") -> nn.Module:
    """Register ``W ← s ⊙ W``; ``mode`` ``"scalar"``, ``"row"`` (per output) or ``"column"`` (per input).

    The multipliers live in ``module.parametrizations.<name>[i].scale`` and train with the model.
    """
    if mode not in ("scalar", "row", "column"):
        raise SpectrakitError(f"mode={mode!r} is not one of scalar, row, column")
    layer = _target_of(module, name, "learnable_multipliers")
    W = layer.value()
    shape = [1] * W.ndim
    if mode != "scalar":
        out_axis = _output_axis(layer)
        axis = out_axis if mode == "row" else 1 - out_axis  # the input axis is the other of the first two
        shape[axis] = W.shape[axis]
    parametrize.register_parametrization(module, name, LearnableMultipliers(tuple(shape), W.dtype, W.device, mode))
    return module


def remove_parametrizations(module: nn.Module, name: str = "weight") -> nn.Module:
    """Bake ``module.<name>`` in (its current value becomes a plain parameter); returns ``module``.

    Removes every parametrization on ``name`` — spectrakit's and others — and the
    forward hooks :func:`spectral_normalize` added. The model's outputs are unchanged.
    """
    if not parametrize.is_parametrized(module, name):
        raise SpectrakitError(f"remove_parametrizations: {type(module).__name__}.{name} is not parametrized")
    hooks = [handle for p in _parametrizations(module, name) if (handle := getattr(p, "hook_handle", None)) is not None]
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for handle in hooks:
        handle.remove()
    return module
