"""σ₁ of a layer as the penalties and parametrizations see it: the matrix, or the conv operator.

* :class:`ConvInputShapes` — each conv layer's input grid, for its operator spectrum;
* :func:`operator_blocks` — the per-frequency matrices of a (grouped, dilated) convolution;
* :func:`top_singular_value` — σ₁ by persistent power iteration, SVD or the Gram bound;
* :func:`warm_up` — converge fresh power-iteration vectors before the first training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ..errors import SpectrakitError
from ._base import CONV_KINDS, Target

# Spatial grid assumed for a conv's operator norm until a forward pass shows the real input size.
PROVISIONAL_GRID = 32


class ConvInputShapes:
    """Spatial input size of each selected conv layer, for its exact operator spectrum.

    Known from ``input_shapes`` (keyed by module or parameter name), from one forward pass
    of ``example_input``, or — kept up to date by a forward pre-hook — from the inputs the
    layer really sees. Until then a ``PROVISIONAL_GRID`` grid per axis is assumed.
    """

    def __init__(self, targets: list[Target], input_shapes: Mapping[str, Sequence[int]] | None = None,
                 example_input: Any = None, model: nn.Module | None = None) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.handles = []
        convs = [t for t in targets if t.kind in CONV_KINDS]
        for target in convs:
            given = (input_shapes or {}).get(target.module_name, (input_shapes or {}).get(target.name))
            if given is not None:
                self.shapes[target.name] = tuple(int(s) for s in given)[-(target.kernel().ndim - 2):]
            elif target.module is not None:
                self.handles.append(target.module.register_forward_pre_hook(self._hook(target)))
        if example_input is not None and model is not None and self.handles:
            with torch.no_grad():
                model(**example_input) if isinstance(example_input, dict) else model(example_input)

    def _hook(self, target: Target) -> Callable[[nn.Module, tuple], None]:
        shapes, name = self.shapes, target.name  # no reference to self: the hook must not keep it alive

        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                spatial = cast(torch.Tensor, module.weight).ndim - 2  # a conv: its weight is a tensor
                shapes[name] = tuple(args[0].shape[-spatial:])
        return record

    def get(self, target: Target) -> tuple[int, ...]:
        kernel = target.kernel()
        size = self.shapes.get(target.name)
        if size is None:
            size = tuple(max(PROVISIONAL_GRID, k) for k in kernel.shape[2:])
        dilation = as_tuple(target.conv_option("dilation", 1), kernel.ndim - 2)
        # the kernel's effective (dilated) extent must fit in the grid
        return tuple(max(s, (k - 1) * d + 1) for s, k, d in zip(size, kernel.shape[2:], dilation))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def as_tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def operator_blocks(target: Target, kernel: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Per-frequency matrices ``(B, out/g, in/g)`` of the layer's circular convolution.

    A dilated kernel is spread out with zeros first; a grouped conv is block-diagonal, so
    each group's blocks are stacked (its norm is the largest over groups). Stride is
    ignored: subsampling can only shrink the norm, so the stride-1 value is an upper bound.
    """
    from ..linalg import conv_frequency_matrices

    spatial_dims = kernel.ndim - 2
    dilation = as_tuple(target.conv_option("dilation", 1), spatial_dims)
    if any(d > 1 for d in dilation):
        size = [(k - 1) * d + 1 for k, d in zip(kernel.shape[2:], dilation)]
        spread = kernel.new_zeros(*kernel.shape[:2], *size)
        index = (slice(None), slice(None), *(slice(None, None, d) for d in dilation))
        spread[index] = kernel
        kernel = spread
    groups = int(target.conv_option("groups", 1))
    try:
        if groups == 1:
            return conv_frequency_matrices(kernel, spatial)
        per_group = kernel.shape[0] // groups
        return torch.cat([conv_frequency_matrices(part, spatial) for part in kernel.split(per_group, dim=0)])
    except SpectrakitError as error:  # name the parameter, not linalg's generic "kernel"
        raise SpectrakitError(f"parameter {target.name!r}: {error}") from None


def top_singular_value(X: torch.Tensor, method: str, state: Any = None, n_iter: int | None = None) -> torch.Tensor:
    """σ₁ of a matrix, or the largest over a batch of blocks (a conv's frequencies); differentiable.

    ``power`` uses the persistent :class:`spectrakit.linalg.PowerIteration` ``state``;
    ``exact`` the SVD; ``gram`` the certified Gram-iteration upper bound.
    """
    from .. import linalg

    if method == "power":
        values = state(X)
    elif method == "exact":
        values = linalg.spectral_norm(X, "exact")
    elif method == "gram":
        values = linalg.spectral_norm(X, "gram", n_iter=n_iter)
        values = values.to(X.real.dtype if X.is_complex() else X.dtype)
    else:
        raise SpectrakitError(f"method={method!r} is not one of power, exact, gram")
    return values.amax() if values.ndim else values


def warm_up(state: Any, X: torch.Tensor, iterations: int, max_iterations: int = 5000) -> None:
    """Converge fresh power-iteration vectors now (no gradient) when ``state`` has none for ``X``.

    Runs chunks of ``iterations`` steps until the right vector stops moving (to about the
    dtype's precision) or ``max_iterations`` is spent, so the first training step already
    sees σ₁ and its gradient ``u vᵀ``, even when σ₂ is close to σ₁.
    """
    if state.sized_for(X):
        if bool(state.u.any()):
            return
        # A zero matrix (a zero-initialized layer, an exactly orthogonal W in G − I) leaves
        # zero vectors that would stay zero forever: start again from a random vector.
        state.reset()
    real = X.real.dtype if X.is_complex() else X.dtype
    tolerance = 1e-12 if real == torch.float64 else 1e-6
    with torch.no_grad():
        X = X.detach()
        done = 0
        while done < max_iterations:
            before = state.v.clone() if state.sized_for(X) else None  # vectors for another shape restart
            state.step(X, iterations)
            done += iterations
            if before is not None:
                # |cos| between successive vectors → 1 once converged (the sign may flip)
                cosine = (before.conj() * state.v).sum(-1).abs()
                if bool((1 - cosine).abs().max() < tolerance):
                    break
