"""Spectral regularization: each layer's top singular value pulled toward a target.

For every selected weight ``W_l`` (canonical ``out × in``; conv kernels reshaped, or the
true operator with ``conv="operator"``) and, when the layer has one, its bias ``b_l``:

    R(θ) = Σ_l (σ₁(W_l)^k − τ^k)²  +  β · Σ_l ‖b_l‖₂^{2k}

with ``τ = target`` (1 by default), ``k = power`` (2) and ``β = bias_weight`` (1). This is
the regularizer of *Learning Continually by Spectral Regularization* (Lewandowski et al.,
ICLR 2025): keeping σ₁ near 1 preserves the initialization's gradient diversity, and the
bias, whose "spectral norm" is its Euclidean norm, is pulled toward 0. It is zero exactly
when every σ₁ equals the target and every bias vanishes.

σ₁ comes from :class:`spectrakit.linalg.PowerIteration` with vectors that persist between
calls (``n_iter`` iterations per call, after a warm-up to convergence at construction), so a
training step pays two matrix-vector products per layer; ``method="exact"`` uses the SVD
and ``method="gram"`` the certified Gram-iteration upper bound.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> penalty = sk.regularize.SpectralPenalty(model, target=1.0)
>>> loss = penalty()                       # add λ·loss to the task loss
>>> loss.ndim, bool(loss >= 0)
(0, True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SpectrakitError
from ..linalg import PowerIteration
from ..linalg.norms import host_floats, power_step_host, power_steps
from ._base import CONV_KINDS, Patterns, Penalty, Target
from ._operators import ConvInputShapes, operator_blocks, top_singular_value, warm_up

WARMUP_ITERS = 50  # per convergence check


class SpectralPenalty(Penalty):
    """``Σ_l (σ₁(W_l)^k − target^k)² + bias_weight · Σ_l ‖b_l‖^{2k}``.

    Args:
        seed: seed of the power iteration's starting vectors.
        source: a model, a dict of tensors or a list of tensors / ``(name, tensor)`` pairs
            (biases are found through a model's layers only).
        target: the σ₁ every layer is pulled toward.
        power: the exponent ``k``.
        method: ``"power"`` (persistent power iteration), ``"exact"`` (SVD) or ``"gram"``.
        n_iter: power iterations per call.
        update_every: advance the power iteration on every ``update_every``-th call only (in
            between, σ₁ is ``uᵀWv`` on the kept vectors: still a lower estimate).
        bias_weight: weight of the bias term (0 switches it off).
        conv: ``"reshape"`` — σ₁ of the kernel as an ``out × in·k…`` matrix (as in the paper
            and Miyato et al.) — or ``"operator"`` — the norm of the circular convolution on
            the layer's input grid (see :class:`~spectrakit.regularize._base.ConvInputShapes`).
        input_shapes, example_input: the conv layers' input sizes, for ``conv="operator"``.
        include, exclude, kinds: which weights (name patterns, record kinds).
        reduction: ``"sum"`` or ``"mean"`` over layers.
    """

    def __init__(self, source: nn.Module | Mapping[str, torch.Tensor] | Iterable[Any], target: float = 1.0, *,
                 power: float = 2.0, method: str = "power", n_iter: int = 1, bias_weight: float = 1.0,
                 update_every: int = 1, conv: str = "reshape", input_shapes: Mapping[str, Sequence[int]] | None = None,
                 example_input: Any = None, seed: int = 0, include: Patterns = None, exclude: Patterns = None,
                 kinds: str | Iterable[str] | None = None, reduction: str = "sum") -> None:
        super().__init__(source, include=include, exclude=exclude, kinds=kinds, reduction=reduction)
        if method not in ("power", "exact", "gram"):
            raise SpectrakitError(f"method={method!r} is not one of power, exact, gram")
        if conv not in ("reshape", "operator"):
            raise SpectrakitError(f"conv={conv!r} is not one of reshape, operator")
        if not target > 0 or not power > 0:
            raise SpectrakitError(f"target={target!r} and power={power!r} must be positive")
        self.target, self.power, self.method, self.conv = float(target), float(power), method, conv
        self.bias_weight = float(bias_weight)
        if not isinstance(update_every, int) or update_every < 1:
            raise SpectrakitError(f"update_every={update_every!r} must be a positive integer")
        self.update_every, self.calls = update_every, 0
        self.last_values: tuple[float, list[float]] = (0.0, [])
        self._operands: tuple[list, list, list] | None = None  # see _power_operands
        self.states = [PowerIteration(n_iter, seed=seed + i) for i in range(len(self.targets))]
        self.shapes = ConvInputShapes(self.targets, input_shapes, example_input,
                                      source if isinstance(source, nn.Module) else None) if conv == "operator" else None
        with torch.no_grad():  # warm the persistent vectors up now
            for i, t in enumerate(self.targets):
                self.sigma(t, i)

    def operand(self, target: Target) -> torch.Tensor:
        """The matrix (or batch of per-frequency matrices) whose σ₁ is penalized."""
        if self.shapes is not None and target.kind in CONV_KINDS:
            return operator_blocks(target, target.kernel(), self.shapes.get(target))
        return target.matrix()

    def sigma(self, target: Target, index: int) -> torch.Tensor:
        X = self.operand(target)
        if self.method == "power":
            warm_up(self.states[index], X, WARMUP_ITERS)  # no-op once the vectors fit X
        return top_singular_value(X, self.method, self.states[index])

    def term(self, target: Target, index: int) -> torch.Tensor:
        value = (self.sigma(target, index) ** self.power - self.target ** self.power) ** 2
        bias = target.bias() if self.bias_weight else None
        if bias is not None:
            value = value + self.bias_weight * bias.to(value.dtype).square().sum() ** self.power
        return value

    def forward(self) -> torch.Tensor:
        with self._resetting_on_error():
            if self.method == "power" and self.shapes is None:
                return self.power_forward()
            return super().forward()

    @contextlib.contextmanager
    def _resetting_on_error(self) -> Iterator[None]:
        try:
            yield
        except SpectrakitError:
            for state in self.states:  # NaN vectors must not outlive the bad weights
                state.reset()
            raise

    def power_forward(self) -> torch.Tensor:
        """The same value and gradient as the generic path, in one autograd node.

        A training step on a small model is a few hundred operator calls, so a per-layer
        autograd graph (σ = uᵀWv, powers, bias norms) would cost about as much as the step
        itself. Here :class:`_SpectralTerms` runs the power iteration and the scalar algebra
        without a graph and supplies the gradient in closed form — ``∂/∂W (σ^k − τ^k)² =
        2k(σ^k − τ^k)σ^{k−1}·u vᵀ``, exactly what differentiating ``uᵀWv`` gives — and one
        host synchronization checks finiteness and degenerate (zero) layers together. With
        ``n_iter=1`` (the default) a layer costs two matrix-vector products and two norms per
        call (:func:`spectrakit.linalg.norms.power_step_host`) and one ``addr`` in backward.
        """
        advance, matrices, biases = self._power_call()
        total = _SpectralTerms.apply(self, advance, len(matrices), *matrices, *biases)
        self._check_power_values()
        return total

    def add_gradient_(self, weight: float, params: Iterable[torch.Tensor] | None = None) -> float:
        """:meth:`Penalty.add_gradient_` without autograd where the weights are the layers'
        own parameters: the closed-form gradient goes into ``.grad`` in place (one ``addr_``
        per weight, one ``add_`` per bias), so an attached penalty costs the power
        iteration and these updates only."""
        if not (self.method == "power" and self.shapes is None):
            return super().add_gradient_(weight, params)
        self._power_operands()
        if self._operands is None:  # views, copies or bare tensors: let autograd route the gradient
            return super().add_gradient_(weight, params)
        owned = None if params is None else {id(p) for p in params}
        with self._resetting_on_error():
            advance, matrices, biases = self._power_call()
            with torch.no_grad():
                terms = _evaluate_terms(self, advance, matrices, biases)
                self._check_power_values()
                for X, (x, y, s), c in zip(matrices, terms.vectors, terms.weight_coef):
                    if not X.requires_grad or (owned is not None and id(X) not in owned):
                        continue  # frozen (autograd would leave it alone too), or not this optimizer's
                    if X.grad is None:
                        X.grad = torch.addr(X, x, y, beta=0, alpha=weight * c * s)
                    else:
                        X.grad.addr_(x, y, alpha=weight * c * s)
                for b, c in zip(biases, terms.bias_coef):
                    if not b.requires_grad or (owned is not None and id(b) not in owned):
                        continue
                    if b.grad is None:
                        b.grad = b.detach() * (weight * c)
                    else:
                        b.grad.add_(b, alpha=weight * c)
            return terms.total

    def _power_call(self) -> tuple[bool, list[torch.Tensor], list[torch.Tensor]]:
        """Count the call; this call's matrices and biases, with power-iteration vectors that fit them."""
        # nn.Module.__setattr__ costs microseconds (it looks for parameters, buffers and
        # submodules first); a plain counter can go straight into the instance dict.
        self.__dict__["calls"] = calls = self.calls + 1
        matrices, biases = self._power_operands()
        for X, state in zip(matrices, self.states):
            if not state.fits(X):  # a new layer shape, dtype or device, or restarted vectors
                warm_up(state, X, WARMUP_ITERS)
                state.prepare(X.detach())
        return (calls - 1) % self.update_every == 0, matrices, biases

    def _check_power_values(self) -> None:
        """Name a NaN weight, if any, and restart the iterations of zero layers."""
        value, sigmas = self.last_values
        if not (value < math.inf and min(sigmas) > 0):  # NaN fails both (a NaN σ makes the value NaN)
            self.checked(torch.tensor(value, dtype=torch.float64))
            for state, sigma in zip(self.states, sigmas):
                if sigma == 0:
                    state.reset()  # zero vectors would stay zero: restart from a random vector next call

    def _power_operands(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This call's canonical matrices and biases, re-read only when they may have changed.

        Re-reading every target (``Target.matrix()``, ``Target.bias()``: a few Python attribute
        look-ups per layer) is a tenth of the penalty's cost on a small model. A matrix that
        *is* its module's registered parameter (a Linear weight: no transpose, reshape or
        fp32 copy) stays valid as long as the module still holds that same object: optimizers
        and ``load_state_dict`` update it in place, and ``.data`` swaps (``.to()``,
        ``.double()``) keep the object, whose new shape, dtype and device the caller's
        :meth:`PowerIteration.fits` check sees. So each call only checks, per layer, that the
        module's ``_parameters`` still hold the cached weight and bias objects. A replaced
        weight or bias fails that check and everything is re-read; a parametrized weight (not
        in ``_parameters``), a view (conv kernel, transposed ``Conv1D``), an fp32 copy of a
        half-precision weight or a bare tensor is never cached and is re-read every call.
        """
        if self._operands is not None:
            checks, matrices, biases = self._operands
            for params, key, tensor in checks:
                if params.get(key) is not tensor:
                    break
            else:
                return matrices, biases
        matrices = [t.matrix() for t in self.targets]
        biases = [b for t in self.targets if (b := t.bias()) is not None] if self.bias_weight else []
        checks = []  # (module._parameters, name, the object it must still hold)
        cacheable = True
        for target, X in zip(self.targets, matrices):
            if target.module is None:
                cacheable = False
                break
            params = target.module._parameters
            checks.append((params, target.attr, X))
            if self.bias_weight and target.attr == "weight":
                checks.append((params, "bias", target.bias()))
        cacheable = cacheable and all(params.get(key) is tensor for params, key, tensor in checks)
        self.__dict__["_operands"] = (checks, matrices, biases) if cacheable else None
        return matrices, biases

    def sigmas(self) -> dict[str, float]:
        """The current σ₁ estimate of each layer (advances the power iteration once)."""
        with torch.no_grad():
            return {t.name: float(self.sigma(t, i)) for i, t in enumerate(self.targets)}

    def remove_hooks(self) -> None:
        """Stop tracking conv input sizes (``conv="operator"`` registers forward pre-hooks)."""
        if self.shapes is not None:
            self.shapes.remove()

    def extra_repr(self) -> str:
        return (f"target={self.target}, power={self.power}, method={self.method!r}, conv={self.conv!r}, "
                f"{super().extra_repr()}")


class _SpectralTerms(torch.autograd.Function):
    """``Σ_l (σ_l^k − τ^k)² + β Σ_b ‖b‖^{2k}`` with σ_l from the persistent power iteration;
    gradients in closed form (``u vᵀ`` directions for the weights, ``b`` for the biases), from
    :func:`_evaluate_terms`; the vectors' scale ``s`` is folded into the ``addr`` that builds
    each weight gradient.
    """

    @staticmethod
    def forward(ctx: Any, penalty: SpectralPenalty, advance: bool, n_matrices: int,
                *tensors: torch.Tensor) -> torch.Tensor:
        matrices, biases = tensors[:n_matrices], tensors[n_matrices:]
        terms = _evaluate_terms(penalty, advance, matrices, biases)
        ctx.weight_coef, ctx.bias_coef, ctx.vectors = terms.weight_coef, terms.bias_coef, terms.vectors
        ctx.matrices = matrices  # only as addr's (ignored) input in backward: no version check needed
        ctx.save_for_backward(*biases)
        return torch.full((), terms.total, dtype=matrices[0].dtype, device=matrices[0].device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        biases = list(ctx.saved_tensors)
        if grad.device.type == "cpu":  # reading a CPU scalar is free: scalar multipliers, fused bias update
            g = float(grad)
            # c·u vᵀ in one pass: addr with beta=0 ignores its input (W, for the shape only)
            weight_grads = [torch.addr(X, x, y, beta=0, alpha=g * c * s)
                            for X, (x, y, s), c in zip(ctx.matrices, ctx.vectors, ctx.weight_coef)]
            # c·b as 0 + c·b: add() hands its alpha straight to the kernel, where mul(b, c) first
            # wraps c in a tensor and converts it (two extra operator calls per bias); same bits
            bias_grads = []
            if biases:
                zero = _zero(biases[0])
                bias_grads = [torch.add(zero, b, alpha=g * c) for b, c in zip(biases, ctx.bias_coef)]
        else:  # no host round trip on an accelerator
            weight_grads = [torch.outer(x, y).mul_(grad * (c * s))
                            for (x, y, s), c in zip(ctx.vectors, ctx.weight_coef)]
            bias_grads = [b * (grad * c).to(b.dtype) for b, c in zip(biases, ctx.bias_coef)]
        return (None, None, None, *weight_grads, *bias_grads)


@dataclass
class _Terms:
    total: float
    weight_coef: list[float]  # ∂total/∂σ-direction scale of each weight's u vᵀ
    bias_coef: list[float]  # ∂total/∂b = coef · b
    vectors: list[tuple[torch.Tensor, torch.Tensor, float]]  # u vᵀ = s · x yᵀ


def _evaluate_terms(penalty: SpectralPenalty, advance: bool, matrices: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor]) -> _Terms:
    """The penalty's value and closed-form gradient coefficients (no autograd graph).

    The per-layer scalars are brought to the host together (one synchronization on an
    accelerator, which the finiteness check needs anyway) and combined in Python: a dozen tiny
    tensor operations would cost more than the power iteration itself on a small model. The
    vectors stay unnormalized (``u vᵀ = s · x yᵀ``, :meth:`PowerIteration.scaled_vectors`).
    """
    states = penalty.states
    n_iter = states[0].n_iter
    if advance and n_iter >= 1 and all(state.n_iter == n_iter for state in states):
        if n_iter > 1:
            power_steps(states, matrices, n_iter - 1)
        sigma, norm = power_step_host(states, matrices, biases)  # the default: one lean step
    else:
        if advance:  # per-layer iteration counts differ (or are 0)
            for X, state in zip(matrices, states):
                if state.n_iter:
                    power_steps([state], [X], state.n_iter)
        # the Rayleigh quotient uᵀWv on the kept vectors (in between updates: a lower estimate)
        scaled = [state.scaled_vectors() for state in states]
        rayleigh = [torch.dot(x, torch.mv(X, y)) for X, (x, y, _) in zip(matrices, scaled)]
        host = host_floats(rayleigh + (list(torch._foreach_norm(list(biases))) if biases else []))
        # clamp: a Rayleigh quotient can dip below 0 by rounding, and a fractional power of
        # a negative float would be complex
        sigma = [max(r * s, 0.0) if r == r else r for r, (_, _, s) in zip(host, scaled)]
        norm = host[len(matrices):]
    k, tau_k, beta = penalty.power, penalty.target ** penalty.power, penalty.bias_weight
    scale = 1 / len(matrices) if penalty.reduction == "mean" else 1.0
    try:
        total = scale * (sum((s ** k - tau_k) ** 2 for s in sigma) + beta * sum(n ** (2 * k) for n in norm))
        weight_coef = [scale * 2 * k * (s ** k - tau_k) * _power(s, k - 1) for s in sigma]
        bias_coef = [scale * 2 * k * beta * _power(n, 2 * k - 2) for n in norm]
    except OverflowError:  # a diverging run (σ ≳ 1e77 in float64): reported as not finite
        total, weight_coef, bias_coef = math.inf, [0.0] * len(sigma), [0.0] * len(norm)
    penalty.__dict__["last_values"] = (total, sigma)  # not through nn.Module.__setattr__ (slow)
    return _Terms(total, weight_coef, bias_coef, [state.scaled_vectors() for state in states])


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A shared 0-dim zero of ``like``'s dtype and device (read-only: only ever an addend)."""
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


def _power(x: float, exponent: float) -> float:
    """``x ** exponent``, with 0 for ``x = 0`` and a negative exponent (the subgradient at a kink
    of ``σ^k`` for ``k < 1``, instead of Python's ZeroDivisionError)."""
    return 0.0 if x == 0 and exponent < 0 else x ** exponent
