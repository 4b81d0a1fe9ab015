"""What every weight penalty shares: choosing tensors by name, their canonical shape, the checks.

A penalty is built from a *source* — an ``nn.Module``, a mapping ``name → tensor``, or an
iterable of tensors or ``(name, tensor)`` pairs — and name patterns. Patterns follow
:func:`spectrakit.weights.iter_matrices`: one with ``*?[`` is an ``fnmatch`` pattern over
the full parameter name, one without matches as a substring.

Matrices are selected through :func:`spectrakit.weights.iter_matrices`, so a penalty sees the
same layers, kinds and canonical ``out × in`` orientation as the rest of spectrakit
(transformers' ``Conv1D`` is transposed; conv kernels flatten to ``out × in·k…``). The live
tensor is re-read from its module on every call (``getattr(module, "weight")``), so a
parametrized weight is penalized as the layer really uses it and gradients reach its
``original``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SpectrakitError
from ..weights import iter_matrices
from ..weights.record import matches_any

Patterns = str | Sequence[str] | None
CONV_KINDS = ("conv1d", "conv2d")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(eq=False)
class Target:
    """One selected tensor: where it lives and how to read it in canonical shape."""

    name: str
    kind: str
    module: nn.Module | None = None
    attr: str = "weight"
    tensor: torch.Tensor | None = None  # a bare tensor passed in a list
    transposed: bool = False

    def value(self) -> torch.Tensor:
        """The live tensor, as stored (re-read every call: parametrizations recompute it)."""
        raw = getattr(self.module, self.attr) if self.module is not None else self.tensor
        if raw is None:
            raise SpectrakitError(f"{self.name}: the target holds no tensor")
        return raw.float() if raw.dtype in _LOW_PRECISION else raw  # fp16/bf16 are computed in fp32

    def kernel(self) -> torch.Tensor:
        """Canonical tensor: ``out × in`` for matrices (Conv1D transposed), ``(out, in/g, *k)`` for convs."""
        W = self.value()
        return W.mT if self.transposed else W

    def matrix(self) -> torch.Tensor:
        """Canonical 2-D matrix: conv kernels flatten to ``out × in·k…``; leading unit axes drop."""
        W = self.kernel()
        if W.ndim == 2:
            return W
        if self.kind not in CONV_KINDS:
            while W.ndim > 2 and W.shape[0] == 1:  # e.g. a (1, tokens, dim) position table
                W = W[0]
        return W.reshape(W.shape[0], -1)

    def bias(self) -> torch.Tensor | None:
        """The layer's bias, for a layer's ``weight`` only (another matrix of the module has none)."""
        if self.module is None or self.attr != "weight":
            return None
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) and bias.ndim == 1 else None

    @property
    def module_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    def conv_option(self, option: str, default: Any) -> Any:
        return getattr(self.module, option, default) if self.module is not None else default


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D stores (in, out); matched by name so transformers stays optional.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _patterns(patterns: Patterns, option: str) -> list[str] | None:
    if patterns is None:
        return None
    listed = [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(p, str) and p for p in listed):
        raise SpectrakitError(f"{option}={patterns!r} must be a name pattern or a list of them")
    return listed


def _named_tensors(source: Any, owner: str) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a mapping or an iterable of tensors / pairs."""
    if isinstance(source, Mapping):
        pairs = list(source.items())
    elif isinstance(source, torch.Tensor):
        pairs = [("0", source)]
    else:
        try:
            items = list(source)
        except TypeError:
            raise SpectrakitError(f"{owner}: cannot read parameters from a {type(source).__name__}; "
                                  "pass an nn.Module, a dict or a list of tensors") from None
        pairs = [item if isinstance(item, tuple) and len(item) == 2 else (str(i), item)
                 for i, item in enumerate(items)]
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise SpectrakitError(f"{owner}: parameter {name!r} is a {type(tensor).__name__}, not a tensor")
    if not pairs:
        raise SpectrakitError(f"{owner}: no parameters given")
    return [(str(name), tensor) for name, tensor in pairs]


def _module_target(model: nn.Module, name: str, kind: str) -> Target:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return Target(name, kind, module=module, attr=attr, transposed=kind == "linear" and _is_hf_conv1d(module))


def _kind_of_shape(shape: torch.Size) -> str:
    return {3: "conv1d", 4: "conv2d"}.get(len(shape), "matrix")


def check_tensor(name: str, tensor: torch.Tensor, owner: str) -> None:
    """A clear one-line error for a tensor no penalty can use."""
    if tensor.is_meta:
        raise SpectrakitError(f"{owner}: parameter {name!r} is a meta tensor and holds no data")
    if not tensor.dtype.is_floating_point:
        raise SpectrakitError(f"{owner}: parameter {name!r} has dtype {tensor.dtype}, not floating point")
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise SpectrakitError(f"{owner}: parameter {name!r} contains NaN or Inf values")


def select_matrices(source: Any, include: Patterns, exclude: Patterns, kinds: Iterable[str] | None,
                    owner: str) -> list[Target]:
    """The weight matrices (and conv kernels) of ``source`` that the patterns select.

    Raises :class:`SpectrakitError` for a pattern that matches nothing, a selected
    parameter that is not a matrix, one of the wrong kind, or a NaN/meta/integer tensor.
    """
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    wanted = tuple(kinds) if kinds is not None else None
    if isinstance(source, nn.Module):
        candidates = [(r.name, (r.name, *r.aliases), r.kind) for r in iter_matrices(source, gates=False)]
        others = [(n, tuple(p.shape)) for n, p in source.named_parameters() if p.ndim < 2]
        build = lambda name, kind: _module_target(source, name, kind)  # noqa: E731
    else:
        pairs = _named_tensors(source, owner)
        tensors = dict(pairs)
        candidates = [(n, (n,), _kind_of_shape(t.shape)) for n, t in pairs if t.ndim >= 2]
        others = [(n, tuple(t.shape)) for n, t in pairs if t.ndim < 2]
        if include_p is None and others:  # an explicit list asks for every tensor in it
            name, shape = others[0]
            raise SpectrakitError(f"{owner}: parameter {name!r} of shape {shape} is not a matrix")
        build = lambda name, kind: Target(name, kind, tensor=tensors[name])  # noqa: E731

    if include_p is None:
        # A parametrization's own tensors (multipliers, ``original``s) are not layer weights:
        # the parametrized weight itself is reported under the layer's plain name.
        chosen = [c for c in candidates
                  if (wanted is None or c[2] in wanted) and ".parametrizations." not in f".{c[0]}"]
        if not chosen:
            raise SpectrakitError(f"{owner}: the source has no {'/'.join(wanted or ('matrix',))} weight to regularize")
    else:
        chosen = []
        seen: set[str] = set()
        for pattern in include_p:
            hits = [c for c in candidates if matches_any(c[1], [pattern])]
            if not hits:
                vectors = [(n, s) for n, s in others if matches_any([n], [pattern])]
                if vectors:
                    name, shape = vectors[0]
                    raise SpectrakitError(f"{owner}: parameter {name!r} of shape {shape} is not a matrix "
                                          f"(include={pattern!r})")
                raise SpectrakitError(f"{owner}: include={pattern!r} matches no parameter")
            fitting = [c for c in hits if wanted is None or c[2] in wanted]
            if not fitting:
                raise SpectrakitError(f"{owner}: parameter {hits[0][0]!r} is a {hits[0][2]} weight; "
                                      f"{owner} applies to {'/'.join(wanted or ())} weights")
            chosen += [c for c in fitting if c[0] not in seen]
            seen.update(c[0] for c in fitting)
    if exclude_p:
        chosen = [c for c in chosen if not matches_any(c[1], exclude_p)]
        if not chosen:
            raise SpectrakitError(f"{owner}: exclude={exclude!r} leaves no weight to regularize")
    targets = [build(name, kind) for name, _, kind in chosen]
    for target in targets:
        check_tensor(target.name, target.value(), owner)
    return targets


def select_parameters(source: Any, include: Patterns, exclude: Patterns, owner: str) -> list[Target]:
    """Every parameter (matrices, biases, norm scales) the patterns select, each once."""
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    if isinstance(source, nn.Module):
        pairs: list[tuple[str, torch.Tensor]] = list(source.named_parameters())  # tied parameters once
        targets = {n: _module_target(source, n, "parameter") for n, _ in pairs}
    else:
        pairs = _named_tensors(source, owner)
        targets = {n: Target(n, "parameter", tensor=t) for n, t in pairs}
    names = [n for n, _ in pairs]
    if include_p is not None:
        for pattern in include_p:
            if not any(matches_any([n], [pattern]) for n in names):
                raise SpectrakitError(f"{owner}: include={pattern!r} matches no parameter")
        names = [n for n in names if matches_any([n], include_p)]
    if exclude_p:
        names = [n for n in names if not matches_any([n], exclude_p)]
    if not names:
        raise SpectrakitError(f"{owner}: no parameter to regularize")
    for name in names:
        check_tensor(name, targets[name].value(), owner)
    return [targets[n] for n in names]


class Penalty(nn.Module):
    """Base of the weight penalties: ``penalty()`` returns ``Σ_layers term(layer)`` (or the mean).

    Subclasses set :attr:`default_kinds` and implement :meth:`term`. A non-finite result is
    traced back to the parameter that caused it and reported by name.

    Args:
        source: an ``nn.Module``, or an iterable of ``(name, parameter)`` pairs or parameters.
        include: name glob(s) of the weights to penalize (default: all of the right kinds).
        exclude: name glob(s) to leave out.
        kinds: the layer kinds to take (``"linear"``, ``"conv"``, ``"embedding"``, …); each
            penalty has its own default.
        reduction: ``"sum"`` over layers, or their ``"mean"``.
    """

    default_kinds: ClassVar[tuple[str, ...] | None] = None
    needs_matrix: ClassVar[bool] = True

    def __init__(self, source: Any, *, include: Patterns = None, exclude: Patterns = None,
                 kinds: str | Iterable[str] | None = None, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise SpectrakitError(f"reduction={reduction!r} is not one of sum, mean")
        self.reduction = reduction
        owner = type(self).__name__
        if self.needs_matrix:
            chosen_kinds = [kinds] if isinstance(kinds, str) else (kinds or self.default_kinds)
            self.targets: list[Target] = select_matrices(source, include, exclude, chosen_kinds, owner)
        else:
            self.targets = select_parameters(source, include, exclude, owner)

    def term(self, target: Target, index: int) -> torch.Tensor:
        raise NotImplementedError

    def named_term(self, target: Target, index: int) -> torch.Tensor:
        """:meth:`term`, with a linalg error (which knows only ``W``) re-raised naming the parameter."""
        try:
            return self.term(target, index)
        except SpectrakitError as error:
            if repr(target.name) in str(error):
                raise
            raise SpectrakitError(f"{type(self).__name__}: parameter {target.name!r}: {error}") from None

    def forward(self) -> torch.Tensor:
        terms = [self.named_term(target, i) for i, target in enumerate(self.targets)]
        total = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        if self.reduction == "mean":
            total = total / len(terms)
        return self.checked(total)

    def add_gradient_(self, weight: float, params: Iterable[torch.Tensor] | None = None) -> float:
        """Add ``weight · ∂penalty/∂θ`` to the ``.grad`` of the tensors the penalty depends on
        (creating it where it is ``None``), as ``(weight · penalty()).backward()`` would —
        only to those in ``params`` when given — and return the penalty's value."""
        with torch.enable_grad():
            value = self()
        if not value.requires_grad:  # every penalized tensor is frozen
            return float(value)
        if params is None:
            (value * weight).backward()
            return float(value)
        chosen = [p for p in params if p.requires_grad]
        if chosen:
            for p, grad in zip(chosen, torch.autograd.grad(value, chosen, allow_unused=True)):
                if grad is None:
                    continue
                if p.grad is None:
                    p.grad = grad * weight  # (autograd may hand back an expanded view)
                else:
                    p.grad.add_(grad, alpha=weight)
        return float(value)

    def attach(self, optimizer: torch.optim.Optimizer, weight: float) -> Any:
        """Apply the penalty through ``optimizer`` instead of the loss: right before every
        ``optimizer.step()``, :meth:`add_gradient_` adds ``weight · ∂penalty/∂θ`` to the
        gradients of the parameters that optimizer updates — the update of adding
        ``weight · penalty()`` to the loss, without a term in the loss's graph. Works with
        ``torch.amp.GradScaler`` (also with fused optimizers, whose gradients stay scaled) and
        with wrappers that keep the torch optimizer in ``.optimizer`` (accelerate); not with
        optimizers that re-evaluate a closure (LBFGS), which clear the gradients inside
        ``step()``. The value of the last step is in :attr:`last_value` (NaN before the first).
        Returns a handle: ``handle.remove()`` detaches the penalty.

        >>> import torch, spectrakit as sk
        >>> model = torch.nn.Linear(8, 4)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = sk.regularize.L2Penalty(model).attach(optimizer, weight=1e-4)
        >>> model(torch.randn(2, 8)).sum().backward()
        >>> optimizer.step()
        >>> handle.remove()
        """
        owner = f"{type(self).__name__}.attach"
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 <= weight < float("inf")):
            raise SpectrakitError(f"{owner}: weight={weight!r} must be a finite number ≥ 0")
        inner = optimizer
        while isinstance(wrapped := getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = wrapped  # a wrapper such as accelerate's AcceleratedOptimizer: hook what it steps
        if not hasattr(inner, "register_step_pre_hook"):
            raise SpectrakitError(f"{owner}: {type(optimizer).__name__} is not a torch optimizer (no "
                                  "register_step_pre_hook); attach to the one it wraps, or add the penalty to the loss")
        if isinstance(inner, torch.optim.LBFGS):
            raise SpectrakitError(f"{owner}: LBFGS re-evaluates its closure and clears the gradients inside "
                                  "step(); add weight · penalty() to the loss in the closure instead")
        self.__dict__["last_value"] = math.nan

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # torch passes step's own arguments, the optimizer first: (optimizer, closure?)
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            if closure is not None:
                raise SpectrakitError(f"{owner}: optimizer.step(closure) re-evaluates the loss inside step(); "
                                      "add weight · penalty() to the loss in the closure instead")
            # a fused optimizer under GradScaler divides the still-scaled gradients by grad_scale
            scale = getattr(optimizer, "grad_scale", None)
            factor = float(weight) * (1.0 if scale is None else float(scale))
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.__dict__["last_value"] = self.add_gradient_(factor, params)

        return inner.register_step_pre_hook(before_step)

    def per_layer(self) -> dict[str, float]:
        """Each selected tensor's term, as floats, for logging."""
        with torch.no_grad():
            return {t.name: float(self.term(t, i)) for i, t in enumerate(self.targets)}

    def checked(self, total: torch.Tensor) -> torch.Tensor:
        # One scalar check per call instead of scanning every weight: only on failure do we
        # look for the parameter to blame, so a healthy training step pays almost nothing.
        if not bool(torch.isfinite(total.detach())):
            owner = type(self).__name__
            for target in self.targets:
                check_tensor(target.name, target.value(), owner)
                bias = target.bias()
                if bias is not None:
                    check_tensor(target.name.rsplit(".", 1)[0] + ".bias", bias, owner)
            raise SpectrakitError(f"{owner}: the penalty is not finite (overflow?) although every weight is")
        return total

    def extra_repr(self) -> str:
        return f"{len(self.targets)} tensors, reduction={self.reduction!r}"
