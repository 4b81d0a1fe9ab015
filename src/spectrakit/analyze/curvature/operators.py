"""Curvature matrix-vector products over a chosen set of parameters, averaged over batches.

For parameters ``θ`` (flattened, ``n`` entries), batches ``b = 1…B``, network outputs
``z_b = f(θ, x_b)`` and losses ``L_b = mean(ℓ_b(z_b, y_b))``:

* ``kind="hessian"``: ``H v = (1/B) Σ_b ∇²_θ L_b · v``, exactly, by double backward
  (Pearlmutter's trick: ``∇_θ ⟨∇_θ L_b, v⟩``);
* ``kind="ggn"``: the generalized Gauss–Newton ``G v = (1/B) Σ_b J_bᵀ (∇²_z L_b) J_b v``
  with ``J_b = ∂z_b/∂θ``; ``J v`` comes from the double-VJP trick (``J v = ∂/∂u ⟨Jᵀu, v⟩``),
  the output Hessian from double backward on the detached outputs;
* ``kind="fisher"``: the empirical Fisher ``F v = (1/B) Σ_b (1/N_b) Σ_n ∇ℓ_n ⟨∇ℓ_n, v⟩``
  over the ``N_b`` per-example losses the loss function returns (a scalar loss is one
  example per batch).

A *block* is a subset of the parameters (by default each module's own parameters, e.g. a
layer's weight and bias). The product of a block's diagonal block ``A_bb v_b`` only
differentiates with respect to that block's parameters, so every block costs a fraction
of the full product.

>>> import torch
>>> model = torch.nn.Linear(3, 1).double()
>>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> op = CurvatureOperator(model, torch.nn.functional.mse_loss, [(x, y)])
>>> H = torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)])
>>> X = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], 1)
>>> torch.allclose(H, 2 * X.T @ X / 8)        # MSE on a linear model: H = 2XᵀX/N
True
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...errors import SpectrakitError

KINDS = ("hessian", "ggn", "fisher")
Forward = Callable[[nn.Module, Any], tuple[Any, Any]]
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(outputs, target)`` of one batch: ``(x, y)`` → ``(model(x), y)``; a dict →
    ``(model(**batch), batch)``; anything else → ``(model(batch), batch)``.

    Args:
        model: the module.
        batch: one element of ``batches``.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return model(batch[0]), batch[1]
    if isinstance(batch, Mapping):
        return model(**batch), batch
    return model(batch), batch


def output_tensor(outputs: Any) -> torch.Tensor:
    """The tensor a loss is taken on: ``outputs`` itself, its ``.logits``, or its first entry.

    Args:
        outputs: what the model returned.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise SpectrakitError(f"model output of type {type(outputs).__name__} holds no tensor to take the loss on")


def select_parameters(model: nn.Module, params: str | Sequence[Any] | None) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the chosen parameters, in the model's order.

    Args:
        model: the module.
        params: ``None`` (every parameter that requires grad), a name glob (fnmatch), or a
            sequence of names, globs or parameter tensors.
    """
    named: list[tuple[str, torch.Tensor]] = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        by_id = {id(w) for w in wanted if isinstance(w, torch.Tensor)}
        patterns = [w for w in wanted if isinstance(w, str)]
        chosen = [(name, p) for name, p in named
                  if id(p) in by_id or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                raise SpectrakitError(f"params: {pattern!r} matches no parameter that requires grad")
    if not chosen:
        raise SpectrakitError("params: no parameter that requires grad was chosen")
    bad = [name for name, p in chosen if not p.dtype.is_floating_point]
    if bad:
        raise SpectrakitError(f"params: {bad[0]} is not floating point")
    return chosen


def group_blocks(names: Sequence[str], blocks: str) -> dict[str, list[int]]:
    """Block name → indices into ``names``: ``"layer"`` groups by owning module (the name
    without its last component), ``"parameter"`` gives each parameter its own block.

    Args:
        names: parameter names.
        blocks: ``"layer"`` or ``"parameter"``.
    """
    if blocks not in ("layer", "parameter"):
        raise SpectrakitError(f"blocks={blocks!r} must be 'layer' or 'parameter'")
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        key = name.rsplit(".", 1)[0] if blocks == "layer" and "." in name else name
        groups.setdefault(key, []).append(index)
    return groups


def check_dropout(model: nn.Module) -> None:
    """Refuse active dropout (random products); warn that eval mode switches it off."""
    rates = [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not rates:
        return
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0):
        raise SpectrakitError(f"model is in training mode with dropout (p={max(rates)}): every product would "
                              "be random; call model.eval() first")
    warnings.warn(f"model is in eval mode and has dropout (p={max(rates)}): this is the curvature of the "
                  "loss without dropout, not of the training loss", stacklevel=3)


@dataclass
class _BatchState:
    """What one batch's products reuse (kept when ``cache=True``)."""

    grads: list[torch.Tensor | None] = field(default_factory=list)   # hessian: ∇_θ L with its graph
    outputs: torch.Tensor | None = None      # ggn: z with its graph to θ
    detached: torch.Tensor | None = None     # ggn: z detached, its ∇_z L with a graph
    output_grad: torch.Tensor | None = None
    dual: torch.Tensor | None = None         # ggn / fisher: the u of the double-VJP trick
    dual_grads: list[torch.Tensor | None] = field(default_factory=list)  # Jᵀu with its graph
    losses: torch.Tensor | None = None       # fisher: the per-example losses


class CurvatureOperator:
    """Products with the Hessian, GGN or empirical Fisher of ``loss_fn`` over ``batches``.

    Args:
        model: the module; products run on its device and in its dtype.
        loss_fn: ``loss_fn(output, target)`` → a scalar or per-example losses (their mean
            is the loss); ``output`` is the model's output tensor (``.logits`` of a
            Hugging Face output).
        batches: an iterable of batches (read once and kept).
        params: which parameters (see :func:`select_parameters`).
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        forward: ``forward(model, batch)`` → ``(outputs, target)``; default
            :func:`default_forward`.
        blocks: ``"layer"`` or ``"parameter"`` (see :func:`group_blocks`).
        cache: keep each batch's gradient graph between products (saves a forward and a
            backward per product, costs the graph's memory).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable[Any],
                 params: str | Sequence[Any] | None = None, kind: str = "hessian", *,
                 forward: Forward | None = None, blocks: str = "layer", cache: bool = True) -> None:
        if kind not in KINDS:
            raise SpectrakitError(f"kind={kind!r} must be one of {', '.join(KINDS)}")
        if batches is None:
            raise SpectrakitError("batches: no batches given")
        self.batches = list(batches)
        if not self.batches:
            raise SpectrakitError("batches: no batches given (the iterable is empty)")
        check_dropout(model)
        self.model, self.loss_fn, self.kind, self.cache = model, loss_fn, kind, cache
        self.forward = forward or default_forward
        chosen = select_parameters(model, params)
        self.names = [name for name, _ in chosen]
        self.tensors = [p for _, p in chosen]
        self.sizes = [p.numel() for p in self.tensors]
        self.blocks = group_blocks(self.names, blocks)
        self.dtype, self.device = self.tensors[0].dtype, self.tensors[0].device
        self._states: dict[int, _BatchState] = {}
        self.products = 0
        self._state(0)  # fails now, with one line, when the loss ignores the parameters

    @property
    def size(self) -> int:
        """Number of scalar parameters ``n`` covered by the operator."""
        return sum(self.sizes)

    def block_size(self, block: str | None) -> int:
        """Number of parameters of ``block`` (``None``: all of them).

        Args:
            block: a block name from :attr:`blocks`, or ``None``.
        """
        return self.size if block is None else sum(self.sizes[i] for i in self._indices(block))

    def _indices(self, block: str | None) -> list[int]:
        if block is None:
            return list(range(len(self.tensors)))
        if block not in self.blocks:
            raise SpectrakitError(f"block {block!r} is not one of {', '.join(self.blocks)}")
        return self.blocks[block]

    def _forward(self, batch: Any) -> tuple[Any, Any]:
        # the fused attention kernels have no double backward; the math kernel does
        with sdpa_kernel([SDPBackend.MATH]):
            return self.forward(self.model, batch)

    def _loss(self, batch: Any, outputs: torch.Tensor, target: Any) -> torch.Tensor:
        losses = self.loss_fn(outputs, target)
        if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
            raise SpectrakitError(f"loss_fn returned {type(losses).__name__}, not a floating-point tensor")
        return losses

    def _state(self, index: int) -> _BatchState:
        if index in self._states:
            return self._states[index]
        batch = self.batches[index]
        outputs, target = self._forward(batch)
        z = output_tensor(outputs)
        state = _BatchState()
        if self.kind == "hessian":
            loss = self._loss(batch, z, target).mean()
            state.grads = self._grad(loss, self.tensors, create_graph=True)
        elif self.kind == "ggn":
            state.outputs = z
            state.detached = z.detach().requires_grad_(True)
            loss = self._loss(batch, state.detached, target).mean()
            state.output_grad = torch.autograd.grad(loss, state.detached, create_graph=True)[0]
            state.dual = torch.zeros_like(z, requires_grad=True)
            state.dual_grads = self._grad(z, self.tensors, grad_outputs=state.dual, create_graph=True)
        else:
            losses = self._loss(batch, z, target).reshape(-1)
            state.losses = losses
            state.dual = torch.zeros_like(losses, requires_grad=True)
            state.dual_grads = self._grad(losses, self.tensors, grad_outputs=state.dual, create_graph=True)
        if self.cache:
            self._states[index] = state
        return state

    def _grad(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: Any = None,
              create_graph: bool = False) -> list[torch.Tensor | None]:
        if not output.requires_grad:
            raise SpectrakitError(f"the loss does not depend on the chosen parameters ({_names(self.names)})")
        grads: list[torch.Tensor | None] = list(torch.autograd.grad(
            output, inputs, grad_outputs=grad_outputs, create_graph=create_graph, retain_graph=True,
            allow_unused=True))
        if create_graph and all(g is None for g in grads):
            raise SpectrakitError(f"the loss does not depend on the chosen parameters ({_names(self.names)})")
        return grads

    def split(self, vector: torch.Tensor, block: str | None = None) -> list[torch.Tensor]:
        """``vector`` (flat, the block's length) as tensors shaped like the block's parameters.

        Args:
            vector: flat tensor of :meth:`block_size` entries.
            block: the block, or ``None`` for all parameters.
        """
        indices = self._indices(block)
        parts = vector.split([self.sizes[i] for i in indices])
        return [part.view_as(self.tensors[i]) for part, i in zip(parts, indices)]

    def _flat(self, parts: Sequence[torch.Tensor | None], indices: Sequence[int]) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(self.tensors[i]) if g is None else g).reshape(-1)
                          for g, i in zip(parts, indices)])

    def matvec(self, vector: torch.Tensor, block: str | None = None) -> torch.Tensor:
        """``A v`` for the whole operator, or ``A_bb v`` for one diagonal block, averaged over
        the batches; the result is checked for NaN/Inf.

        Args:
            vector: flat tensor of :meth:`block_size` entries.
            block: the block, or ``None`` for all parameters.
        """
        indices = self._indices(block)
        vector = vector.to(device=self.device, dtype=self.dtype)
        parts = self.split(vector, block)
        params = [self.tensors[i] for i in indices]
        total: torch.Tensor | None = None
        for index in range(len(self.batches)):
            product = self._flat(self._product(self._state(index), indices, params, parts), indices)
            total = product if total is None else total + product
        assert total is not None
        total = total / len(self.batches)
        self.products += 1
        if not bool(torch.isfinite(total).all()):
            self._raise_non_finite(total, block)
        return total

    def _product(self, state: _BatchState, indices: Sequence[int], params: list[torch.Tensor],
                 parts: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.kind == "hessian":
            pairs = [(g, p) for g, p in ((state.grads[i], p) for i, p in zip(indices, parts)) if g is not None]
            if not pairs:
                return [None] * len(indices)
            return self._vjp([g for g, _ in pairs], params, [p for _, p in pairs])
        assert state.dual is not None
        pairs = [(g, p) for g, p in ((state.dual_grads[i], p) for i, p in zip(indices, parts)) if g is not None]
        if not pairs:
            return [None] * len(indices)
        # J v = ∂/∂u ⟨Jᵀu, v⟩ (Jᵀu is linear in u, so this is exact at u = 0)
        jv = torch.autograd.grad([g for g, _ in pairs], state.dual, [p for _, p in pairs], retain_graph=True)[0]
        if self.kind == "ggn":
            assert state.output_grad is not None and state.detached is not None and state.outputs is not None
            hjv = torch.autograd.grad(state.output_grad, state.detached, jv, retain_graph=True)[0]
            return self._vjp([state.outputs], params, [hjv])
        assert state.losses is not None
        return self._vjp([state.losses], params, [jv / state.losses.numel()])

    @staticmethod
    def _vjp(outputs: list[torch.Tensor], params: list[torch.Tensor],
             cotangents: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not any(o.requires_grad for o in outputs):  # a loss linear in θ: zero curvature
            return [None] * len(params)
        return list(torch.autograd.grad(outputs, params, cotangents, retain_graph=True, allow_unused=True))

    def _raise_non_finite(self, product: torch.Tensor, block: str | None) -> None:
        indices = self._indices(block)
        offsets = 0
        for i in indices:
            piece = product[offsets:offsets + self.sizes[i]]
            offsets += self.sizes[i]
            if not bool(torch.isfinite(piece).all()):
                owner = next(name for name, members in self.blocks.items() if i in members)
                raise SpectrakitError(f"{self.kind}-vector product has NaN/Inf in block {owner!r} "
                                      f"(parameter {self.names[i]})")
        raise SpectrakitError(f"{self.kind}-vector product has NaN/Inf")

    def gradient(self, block: str | None = None) -> torch.Tensor:
        """The loss gradient averaged over the batches (flat; the block's part for a block).

        Args:
            block: the block, or ``None`` for all parameters.
        """
        indices = self._indices(block)
        params = [self.tensors[i] for i in indices]
        total: torch.Tensor | None = None
        for batch in self.batches:
            outputs, target = self._forward(batch)
            loss = self._loss(batch, output_tensor(outputs), target).mean()
            flat = self._flat(list(torch.autograd.grad(loss, params, allow_unused=True)), indices).detach()
            total = flat if total is None else total + flat
        assert total is not None
        return total / len(self.batches)

    def release(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product)."""
        self._states.clear()


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … {len(names) - limit} more" if len(names) > limit else "")
