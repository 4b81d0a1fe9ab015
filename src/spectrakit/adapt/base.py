"""The shared protocol of every adapter: a wrapper around one frozen linear layer.

An :class:`AdaptedLinear` replaces an ``nn.Linear`` (or a transformers ``Conv1D``,
whose weight is stored ``in × out``) inside a model. It keeps the original layer
as ``base_layer`` (frozen), adds the method's own parameters, and defines

* ``forward(x)`` — explicit, usually ``base_layer(x) + Δ(x)`` without forming ``ΔW``;
* ``delta_weight()`` — ``ΔW`` in the ``out × in`` orientation, in the adapter dtype;
* ``merged_weight()`` — ``W + ΔW`` (multiplicative methods override it).

Every matrix an adapter sees is ``out × in``: the Conv1D orientation is handled
here, once. A bf16/fp16 base keeps its dtype while the adapter's parameters are
fp32; the low-rank path runs in fp32 and is cast back to the input's dtype.

A method is a subclass registered under its ``method`` name. Its ``plan`` class
method turns ``(rank, options)`` into per-layer keyword arguments, so that methods
that look at the whole model first (EVA's calibration, SoMA's frozen blocks) fit
the same :func:`spectrakit.adapt` call.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, ClassVar, NoReturn

import torch
from torch import nn

from .. import linalg
from .._targets import select_targets
from ..cache import active_cache, stored_layout
from ..errors import SpectrakitError
from .distributed import stand_in_factors

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_REGISTRY: dict[str, type[AdaptedLinear]] = {}
#: while one layer's adapter is built (:func:`building`): its weight's id and version counter then
_BUILDING_LAYER: ContextVar[tuple[int, int] | None] = ContextVar("spectrakit_adapt_building_layer", default=None)


@contextlib.contextmanager
def building(layer: nn.Module) -> Iterator[None]:
    """Mark the construction of ``layer``'s adapter (``cls(layer, …)`` inside the block).

    Inside it, :meth:`AdaptedLinear.factors` keys the spectrum cache with the fingerprint the
    constructor has just taken of the base weight instead of hashing it a second time, as
    long as the weight's version counter shows no in-place write since the block began.
    Outside such a block the weight is always hashed afresh, so a weight changed later
    (even through ``.data``, which the counter does not see) is never keyed by an old hash.

    Args:
        layer: the ``nn.Linear`` or ``Conv1D`` about to be wrapped.
    """
    weight = layer.weight
    token = _BUILDING_LAYER.set((id(weight), weight._version) if isinstance(weight, torch.Tensor) else None)
    try:
        yield
    finally:
        _BUILDING_LAYER.reset(token)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family), matched by name so transformers stays optional."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (bitwise identity of a base weight)."""
    digest = hashlib.sha256(f"{weight.dtype}|{tuple(weight.shape)}|".encode())
    data = weight.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest.update(data.data)  # ndarray.data: a memoryview of the bytes
    return digest.hexdigest()


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair so the largest-magnitude entry of ``uᵢ`` is positive.

    Singular vectors are defined up to a joint sign flip; fixing it makes adapters that
    mix different pairs (SVFT's off-diagonal M, rotations) reproducible across runs.
    """
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, pivot[None]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs[:, None]


def singular_factors(W: torch.Tensor, rank: int, which: str = "top", svd_method: str = "krylov",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (m×r), S (r), Vh (r×n)`` of ``W``'s top or bottom ``rank`` singular triplets.

    Top triplets come from ``spectrakit.linalg.svd(W, k=rank)`` with the block Krylov
    method by default (fp32 for fp32/bf16/fp16 weights): its rank-``r`` approximation is
    within 1.001× the Eckart–Young optimum even on the flat spectrum of a randomly
    initialized layer, where a few randomized power iterations fall short, at about their
    cost; small problems go to an exact Gram eigensolve. ``svd_method="gram"`` always
    solves exactly. Bottom triplets need the whole thin SVD, computed once exactly (float64).
    """
    if which == "top":
        U, S, Vh = linalg.svd(W, k=rank, method=svd_method)
    elif which == "bottom":
        U, S, Vh = linalg.svd(W, method="exact", dtype=torch.float64)
        U, S, Vh = U[:, -rank:], S[-rank:], Vh[-rank:]
    else:
        raise SpectrakitError(f"which={which!r} must be 'top' or 'bottom'")
    U, Vh = _canonical_signs(U, Vh)
    return U.to(dtype).contiguous(), S.to(dtype).contiguous(), Vh.to(dtype).contiguous()


def register(cls: type[AdaptedLinear]) -> type[AdaptedLinear]:
    """Class decorator: make ``cls`` available as ``spectrakit.adapt(model, cls.method)``."""
    _REGISTRY[cls.method] = cls
    return cls


def methods() -> tuple[str, ...]:
    """The registered method names."""
    from . import _methods  # noqa: F401  (registers every method)

    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> type[AdaptedLinear]:
    from . import _methods  # noqa: F401

    if not isinstance(name, str) or name not in _REGISTRY:
        raise SpectrakitError(f"unknown adapter method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus a trainable update; subclasses define the update.

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` being adapted (kept, frozen).
        rank: the method's size parameter (see each method's docstring).
        name: the layer's name in the model, for error messages and saved configs.
    """

    method: ClassVar[str] = ""
    #: options the method accepts (checked by :meth:`check_options`)
    options: ClassVar[tuple[str, ...]] = ()
    #: True when the method overwrites the frozen weight (with a residual)
    rewrites_base: ClassVar[bool] = False
    #: the wrapped ``nn.Linear`` or transformers ``Conv1D`` (typed loosely: Conv1D is optional)
    base_layer: Any

    def __init__(self, base_layer: nn.Module, rank: int, *, name: str = "") -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise SpectrakitError(f"{name or 'layer'}: {type(base_layer).__name__} is not nn.Linear or Conv1D")
        self.base_layer = base_layer
        self.layer_name = name
        self.rank = int(rank)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight: torch.Tensor = self.base_layer.weight
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        if weight.is_meta or not weight.dtype.is_floating_point:
            raise SpectrakitError(f"{name}.weight: dtype {weight.dtype} on {weight.device} cannot be adapted")
        self.base_fingerprint = fingerprint(weight)
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.adapter_dtype: torch.dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype

    # ----- what a method may override -------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            allowed = ", ".join(cls.options) or "none"
            raise SpectrakitError(f"method {cls.method!r} has no option {unknown[0]!r} (options: {allowed})")

    @classmethod
    def plan(cls, model: nn.Module, layers: dict[str, nn.Module], rank: int,
             options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-layer constructor keyword arguments; by default every layer gets the same."""
        return {name: {"rank": rank, **options} for name in layers}

    @classmethod
    def check_layer(cls, name: str, out_features: int, in_features: int, kwargs: dict[str, Any]) -> None:
        """Raise a one-line error when ``kwargs`` do not fit an ``out × in`` layer."""
        rank = kwargs.get("rank")
        limit = min(out_features, in_features)
        if limit < 2:
            raise SpectrakitError(f"layer {name} ({out_features}×{in_features}) is too thin to adapt")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < limit:
            raise SpectrakitError(f"rank={rank!r} must be an integer in 1..{limit - 1} for layer {name} "
                                  f"({out_features}×{in_features})")

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` (``out × in``, adapter dtype) such that ``forward`` computes ``x (W + ΔW)ᵀ + b``."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` in the adapter dtype (``out × in``)."""
        return self.base_weight().to(self.adapter_dtype) + self.delta_weight()

    def penalty(self) -> torch.Tensor | None:
        """A regularizer the method asks to add to the loss (``None``: none)."""
        return None

    def config(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this layer (beside ``base_layer``)."""
        signature = inspect.signature(type(self).__init__)
        keep = [p for p in signature.parameters if p not in ("self", "base_layer", "name", "init")]
        return {key: getattr(self, key) for key in keep}

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (what :func:`spectrakit.save_adapter` writes)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, stored like the base layer's (``in × out`` for Conv1D), in its
        dtype and differentiable — for code that reads ``layer.weight`` instead of calling it
        (``nn.MultiheadAttention``'s ``out_proj``, weight inspection)."""
        merged = self.merged_weight().to(self.base_layer.weight.dtype)
        return merged.T if self.fan_in_fan_out else merged

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # ----- helpers shared by the methods ------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The frozen weight in ``out × in`` orientation (a view, in the base dtype)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def write_base_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the frozen weight with an ``out × in`` matrix (cast to the base dtype)."""
        target = self.base_layer.weight
        target.copy_((weight.T if self.fan_in_fan_out else weight).to(target.dtype))

    @torch.no_grad()
    def subtract_from_base(self, left: torch.Tensor, right: torch.Tensor, scale: float = 1.0) -> None:
        """``W ← W − scale · left @ right`` for an ``out × in`` product, in place.

        One ``addmm_`` on the weight as it is stored (``Wᵀ ← Wᵀ − scale · rightᵀ leftᵀ`` for
        ``Conv1D``): no full-size temporaries, and no elementwise pass over a transposed
        view, which costs several times a contiguous one.
        """
        target = self.base_layer.weight
        if target.dtype != self.adapter_dtype:  # compute in the adapter's precision, then cast
            product = (left @ right).to(self.adapter_dtype)
            self.write_base_weight(self.base_weight().to(self.adapter_dtype) - scale * product)
        elif self.fan_in_fan_out:
            target.addmm_(right.T, left.T, alpha=-scale)
        else:
            target.addmm_(left, right, alpha=-scale)

    def new_parameter(self, value: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(value.to(device=self.base_layer.weight.device, dtype=self.adapter_dtype).contiguous())

    def new_buffer(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value.to(device=self.base_layer.weight.device, dtype=self.adapter_dtype)
                             .contiguous(), persistent=False)

    def factors(self, rank: int, which: str = "top", svd_method: str = "krylov"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top/bottom singular triplets of the base weight (:func:`singular_factors`), from the
        spectral core or the :func:`~spectrakit.cache.active_cache` (``adapt(..., cache=)``);
        under torchrun only on the rank that owns this layer (see :mod:`spectrakit.adapt.distributed`).

        A cache entry is keyed by the weight's bytes, dtype and device, ``which``, ``svd_method``
        and the adapter dtype; one for ``k`` triplets serves any ``rank ≤ k`` (the leading ones,
        or the trailing ones for ``which="bottom"``).

        Args:
            rank: the number of triplets.
            which: ``"top"`` (largest σ) or ``"bottom"`` (smallest).
            svd_method: the method of :func:`spectrakit.linalg.svd` for the top triplets.
        """
        stand_in = stand_in_factors(self, rank)
        if stand_in is not None:
            return stand_in
        weight, dtype = self.base_weight().detach(), self.adapter_dtype
        cache = active_cache()
        if cache is None:
            return singular_factors(weight, rank, which, svd_method, dtype=dtype)
        if which not in ("top", "bottom"):  # the same line as without a cache
            raise SpectrakitError(f"which={which!r} must be 'top' or 'bottom'")
        # bottom triplets come from the whole exact SVD whatever svd_method says: one entry for all
        solver = svd_method if which == "top" else "exact"
        return cache.svd(weight, rank, compute=lambda: singular_factors(weight, rank, which, svd_method, dtype=dtype),
                         method=f"adapt-svd:{solver}:{str(dtype).removeprefix('torch.')}", which=which,
                         fingerprint=self._fresh_fingerprint(weight))

    def _fresh_fingerprint(self, weight: torch.Tensor) -> str | None:
        """``content_fingerprint(weight)`` from ``base_fingerprint``, the SHA-256 the constructor
        has just taken of these bytes (one pass over the weight instead of two), or ``None``
        (hash again). Only inside :func:`building` for this layer, with the weight's version
        counter unchanged since the block began (no in-place write since), and where the
        weight as stored is this very parameter, so that both hashes cover the same bytes,
        dtype and shape."""
        parameter = self.base_layer.weight
        if _BUILDING_LAYER.get() != (id(parameter), parameter._version):
            return None
        stored, layout = stored_layout(weight)
        if (stored.shape != parameter.shape or not stored.is_contiguous() or not parameter.is_contiguous()
                or stored.data_ptr() != parameter.data_ptr()):
            return None
        return f"{self.base_fingerprint}-{layout}"

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.adapter_dtype else x.to(self.adapter_dtype)

    def restore(self) -> nn.Module:
        """Write ``merged_weight()`` into the base layer and return it, unwrapped."""
        with torch.no_grad():
            self.write_base_weight(self.merged_weight())
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, True))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank}, out={self.out_features}, in={self.in_features}"


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → every name it is reachable under (more than one: tied)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


# ----- target selection -----------------------------------------------------------------

def _output_layers(model: nn.Module) -> set[int]:
    """ids of layers that ``all-linear`` leaves alone: the output head and any layer whose
    weight is tied to an embedding."""
    skip: set[int] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except Exception:  # some models raise NotImplementedError here
            head = None
        if head is not None:
            skip.add(id(head))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    for module in model.modules():
        if is_linear(module) and id(module.weight) in embeddings:
            skip.add(id(module))
    return skip


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def find_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """The layers ``targets`` selects, by name: ``"all-linear"`` (every Linear/Conv1D but
    the output head) or name patterns (exact name, dotted suffix such as ``"q_proj"``,
    or a shell pattern such as ``"*.mlp.*"``).

    Raises :class:`SpectrakitError` for a pattern that matches no linear layer and for a
    selected layer that is already adapted.

    Args:
        model: the model to search.
        targets: ``"all-linear"`` or a list of name patterns (see above).
    """
    if not isinstance(model, nn.Module):
        raise SpectrakitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    adapted = {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_linear(module) or isinstance(module, AdaptedLinear):
            continue
        owner = name[: -len(".base_layer")] if name.endswith(".base_layer") else None
        if owner is not None and owner in adapted:
            candidates[owner] = adapted[owner]
        else:
            candidates[name] = module

    skip = _output_layers(model)

    def miss(pattern: str) -> NoReturn:
        raise SpectrakitError(f"target pattern {pattern!r} matches no nn.Linear or Conv1D layer")

    selected = select_targets(candidates, targets, verb="adapt", matches=_matches, on_miss=miss,
                              all_linear=lambda layers: {n: m for n, m in layers.items() if id(m) not in skip})
    for name, module in selected.items():
        if isinstance(module, AdaptedLinear):
            raise SpectrakitError(f"layer {name} is already adapted with {module.method!r}; "
                                  "merge(model) before adapting it again")
    return selected


def block_index(name: str) -> int | None:
    """The transformer block a layer belongs to: the first integer in its dotted name
    (``model.layers.3.mlp.up_proj`` → 3, ``transformer.h.0.attn.c_attn`` → 0)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedLinear)}
