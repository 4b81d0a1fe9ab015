"""The training Jacobian ``J = ∂θ_T / ∂θ_0`` of a short training run, matrix-free.

For a training step ``θ_{t+1} = step(θ_t, t)`` run ``T`` times, ``J`` is the product of the
steps' Jacobians (for SGD, ``Π_t (I − η ∇²L_t)``). Its singular values say which directions
of the initialization training amplifies, forgets or leaves alone (seed 003's study of the
training Jacobian's SVD). ``J`` is ``n × n`` for ``n`` parameters, so it is never formed:

* ``Jᵀ u`` by reverse mode through the ``T`` steps, on one recorded graph of the run;
* ``J v`` from the same graph by the double-VJP trick, ``J v = ∂⟨Jᵀu, v⟩/∂u``;
* the top singular pairs by Lanczos (full reorthogonalization) on ``JᵀJ``:
  ``σᵢ = √λᵢ(JᵀJ)``, right vectors ``vᵢ``, left vectors ``uᵢ = J vᵢ / σᵢ``.

``train_step`` must be a pure function of the parameters, twice differentiable by autograd
(a ``torch.func.grad`` inside it is);
:func:`sgd_train_step` builds one for a model.

>>> import torch
>>> A = torch.tensor([[0.5, 0.0], [0.0, 2.0]], dtype=torch.float64)
>>> result = training_jacobian(lambda theta, t: A @ theta, torch.ones(2, dtype=torch.float64), steps=3, k=2)
>>> [round(float(s), 6) for s in result.singular_values]     # diag(0.5, 2)³
[8.0, 0.125]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import SpectrakitError
from .lanczos import top_eigenpairs
from .operators import Forward, LossFn, default_forward, output_tensor

Params = Any  # a tensor, a sequence of tensors or a name → tensor mapping


@dataclass
class TrainingJacobian:
    """Top singular values of ``∂θ_T/∂θ_0`` and, on request, their vectors (flat, ``n × k``)."""

    singular_values: torch.Tensor
    right_vectors: torch.Tensor | None
    left_vectors: torch.Tensor | None
    lanczos_steps: int
    converged: bool


def _flatten(params: Params) -> tuple[torch.Tensor, Callable[[torch.Tensor], Params], Callable[[Params], torch.Tensor]]:
    """``(flat θ, unflatten, flatten)`` for a tensor, a sequence or a mapping of tensors."""
    if isinstance(params, torch.Tensor):
        tensors, keys = [params], None
    elif isinstance(params, Mapping):
        keys = list(params)
        tensors = [params[key] for key in keys]
    elif isinstance(params, Sequence):
        tensors, keys = list(params), None
    else:
        kind = type(params).__name__
        raise SpectrakitError(f"params: expected a tensor, a sequence or a mapping of tensors, not {kind}")
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        raise SpectrakitError("params: every entry must be a floating-point tensor")
    shapes, sizes = [t.shape for t in tensors], [t.numel() for t in tensors]
    kind = "tensor" if isinstance(params, torch.Tensor) else ("mapping" if keys is not None else "sequence")

    def unflatten(flat: torch.Tensor) -> Params:
        parts = [p.view(s) for p, s in zip(flat.split(sizes), shapes)]
        if kind == "tensor":
            return parts[0]
        return dict(zip(keys, parts)) if keys is not None else parts

    def flatten(value: Params) -> torch.Tensor:
        if kind == "tensor":
            return value.reshape(-1)
        items = [value[key] for key in keys] if keys is not None else list(value)
        return torch.cat([t.reshape(-1) for t in items])

    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat, unflatten, flatten


def training_jacobian(train_step: Callable[[Params, int], Params], params: Params, steps: int, k: int = 5, *,
                      tol: float = 1e-6, max_steps: int | None = None, seed: int = 0,
                      vectors: bool = False) -> TrainingJacobian:
    """Top-``k`` singular values (and vectors) of ``∂θ_steps / ∂θ_0``.

    Args:
        train_step: ``train_step(params, t)`` → the parameters after step ``t``, in the
            same layout as ``params``; pure and twice differentiable.
        params: ``θ_0``: a tensor, a sequence, or a name → tensor mapping.
        steps: number of training steps ``T`` (≥ 1).
        k: number of singular values.
        tol: Lanczos tolerance on the eigenpairs of ``JᵀJ``.
        max_steps: most Lanczos steps.
        seed: seed of the Lanczos start vector.
        vectors: also return right and left singular vectors (flat, in ``params`` order).
    """
    if steps < 1:
        raise SpectrakitError(f"steps={steps} must be ≥ 1")
    theta0, unflatten, flatten = _flatten(params)

    def run(theta: torch.Tensor) -> torch.Tensor:
        state = unflatten(theta)
        for t in range(steps):
            state = train_step(state, t)
        return flatten(state)

    theta = theta0.clone().requires_grad_(True)
    with torch.enable_grad():
        theta_final = run(theta)
        if theta_final.shape != theta0.shape:
            raise SpectrakitError(f"train_step changed the parameters' size: {theta0.numel()} → {theta_final.numel()}")
        if not theta_final.requires_grad:
            raise SpectrakitError("train_step's result does not depend on params (was it detached?)")
        if not bool(torch.isfinite(theta_final).all()):
            raise SpectrakitError("training diverged: the final parameters hold NaN/Inf")
        # Jᵀu is linear in u, so J v = ∂⟨Jᵀu, v⟩/∂u at any u (here 0): both products reuse one
        # graph of the run instead of re-running the steps per product
        dual = torch.zeros_like(theta_final, requires_grad=True)
        transposed = torch.autograd.grad(theta_final, theta, dual, create_graph=True)[0]

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(transposed, dual, v, retain_graph=True)[0]

    def gram(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(theta_final, theta, jvp(v), retain_graph=True)[0]

    n = theta0.numel()
    values, right, info = top_eigenpairs(gram, n, k, tol=tol, max_steps=max_steps, seed=seed, dtype=theta0.dtype,
                                         device=theta0.device, vectors=vectors)
    sigma = values.clamp_min(0).sqrt()
    left = None
    if vectors:
        assert right is not None
        safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        left = torch.stack([jvp(right[:, i]) for i in range(right.shape[1])], dim=1) / safe
    return TrainingJacobian(singular_values=sigma, right_vectors=right, left_vectors=left,
                            lanczos_steps=int(info["steps"]), converged=bool(info["converged"]))


def sgd_train_step(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], lr: float, *,
                   forward: Forward | None = None) -> tuple[Callable[[dict[str, torch.Tensor], int],
                                                                  dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A pure SGD step over ``batches`` (step ``t`` uses batch ``t mod B``) and ``θ_0``.

    Args:
        model: the module (its buffers are used as they are).
        loss_fn: ``loss_fn(output, target)`` → a scalar or per-example losses (their mean).
        batches: the batches, read once.
        lr: the learning rate ``η`` of ``θ ← θ − η ∇L``.
        forward: ``forward(model, batch)`` → ``(outputs, target)``; default as in
            :func:`~spectrakit.analyze.hessian`.

    Returns:
        ``(train_step, params)`` for :func:`training_jacobian`.
    """
    batches = list(batches)
    if not batches:
        raise SpectrakitError("batches: no batches given (the iterable is empty)")
    forward = forward or default_forward
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}

    class _Functional(nn.Module):
        def __init__(self, values: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self.values = values

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(model, {**buffers, **self.values}, args, kwargs)

    def loss(values: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        outputs, target = forward(_Functional(values), batch)
        return loss_fn(output_tensor(outputs), target).mean()

    gradient = torch.func.grad(loss)

    def train_step(values: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        grads = gradient(values, batches[t % len(batches)])
        return {name: value - lr * grads[name] for name, value in values.items()}

    return train_step, params
