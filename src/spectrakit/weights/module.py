"""Walk an ``nn.Module`` and describe its weight matrices.

Known layers give their ``.weight`` a kind:

=========================================  ===========  =====================
layer                                      kind         canonical shape
=========================================  ===========  =====================
``nn.Linear`` (and subclasses)             linear       ``(out, in)``
``transformers.pytorch_utils.Conv1D``      linear       ``(out, in)`` — stored
                                                        ``(in, out)``, transposed
``nn.Conv1d`` / ``nn.Conv2d``              conv1d/2d    ``(out, in/g, *k)``
``nn.Embedding`` / ``nn.EmbeddingBag``     embedding    ``(num, dim)``
any other parameter with ``ndim >= 2``     matrix       as stored
=========================================  ===========  =====================

Biases and 1-D parameters (norm scales) are never reported. A parameter reached
under several names (tied embeddings) is reported once, under the first name,
with the others in ``aliases``. A weight under ``torch.nn.utils.parametrize`` is
reported under its plain name (``layer.weight``) and loads the parametrized
value, the matrix the layer really uses.

Example::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    >>> model[1].weight = model[0].weight            # tie output to input embedding
    >>> [(r.name, r.kind, r.aliases) for r in iter_module_matrices(model)]
    [('0.weight', 'embedding', ('1.weight',))]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from spectrakit.weights.record import MatrixRecord

_MODULE_SOURCE = "module"


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Matched by name so that transformers stays an optional dependency.
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _kind_of(module: nn.Module) -> str | None:
    """The record kind for a layer's ``.weight``, or None for an unknown layer."""
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return "linear"
    # ConvTranspose layers store (in, out/g, *k) and are not Conv1d/Conv2d
    # subclasses, so they fall through to "matrix" as stored.
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


@dataclass
class _Weight:
    """What the walk found for one weight, before it becomes a record."""

    kind: str
    transposed: bool
    module: nn.Module | None = None  # set when the weight is parametrized


def _known_weights(model: nn.Module) -> tuple[dict[int, _Weight], dict[int, _Weight]]:
    """Map parameter ids to what their owning layer says about them.

    Returns ``(plain, parametrized)``: ``plain`` is keyed by the weight
    Parameter itself; ``parametrized`` by the ``original`` Parameter(s) hidden
    behind a parametrized ``weight``.
    """
    plain: dict[int, _Weight] = {}
    parametrized: dict[int, _Weight] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        kind = _kind_of(module)
        if kind is None:
            continue
        transposed = _is_hf_conv1d(module)
        if parametrize.is_parametrized(module, "weight"):
            info = _Weight(kind, transposed, module)
            for original in module.parametrizations["weight"].parameters(recurse=False):
                parametrized.setdefault(id(original), info)
            continue
        weight = module._parameters.get("weight")
        if weight is not None:
            plain.setdefault(id(weight), _Weight(kind, transposed))
    return plain, parametrized


def iter_module_matrices(model: nn.Module) -> Iterator[MatrixRecord]:
    """Yield a record for each weight matrix of ``model``, in parameter order.

    Args:
        model: any module; its tensors may be on any device, including ``meta``.

    Example::

        >>> import torch
        >>> conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        >>> (record,) = iter_module_matrices(conv)
        >>> record.kind, record.shape, record.matrix_shape
        ('conv2d', (8, 3, 3, 3), (8, 27))
    """
    plain, parametrized = _known_weights(model)

    # First pass: group every name under its Parameter so ties are known before
    # the first record is built (a tie's second name can come much later).
    names_by_param: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if isinstance(param, nn.parameter.UninitializedParameter):
            continue  # lazy layers before their first forward have no shape yet
        names_by_param.setdefault(id(param), []).append(name)
        params[id(param)] = param

    emitted_parametrized: set[int] = set()
    for key, names in names_by_param.items():
        param = params[key]
        if key in parametrized:
            owner = parametrized[key]
            if id(owner.module) in emitted_parametrized:
                continue  # a second ``original`` of the same parametrization
            emitted_parametrized.add(id(owner.module))
            yield _parametrized_record(owner, names)
            continue
        info = plain.get(key)
        if info is None:
            if param.ndim < 2:
                continue
            info = _Weight("matrix", transposed=False)
        shape = tuple(param.shape)
        if info.transposed:
            shape = shape[::-1]
        yield MatrixRecord(
            name=names[0],
            kind=info.kind,
            shape=shape,
            dtype=param.dtype,
            source=_MODULE_SOURCE,
            aliases=tuple(names[1:]),
            _loader=_param_loader(param),
            _transposed=info.transposed,
            _meta=param.is_meta,
        )


def _param_loader(param: torch.Tensor) -> Callable[[], torch.Tensor]:
    # A closure per parameter: the record holds the Parameter, never a copy.
    return lambda: param.detach()


def _parametrized_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as its parametrizations compute it (a property torch adds at run time)."""
    with torch.no_grad():
        return cast(torch.Tensor, module.weight)


def _parametrized_record(info: _Weight, original_names: list[str]) -> MatrixRecord:
    """A record for ``layer.weight`` where ``layer.parametrizations.weight`` holds it."""
    module = info.module
    assert module is not None
    # "a.b.parametrizations.weight.original" -> "a.b.weight"
    prefixes = [n.split("parametrizations.weight.")[0] for n in original_names]
    names = list(dict.fromkeys(prefix + "weight" for prefix in prefixes))
    value = _parametrized_weight(module)  # evaluated once for shape and dtype: a parametrization may change both
    shape = tuple(value.shape)
    if info.transposed:
        shape = shape[::-1]

    def load() -> torch.Tensor:
        return _parametrized_weight(module)

    return MatrixRecord(
        name=names[0],
        kind=info.kind,
        shape=shape,
        dtype=value.dtype,
        source=_MODULE_SOURCE,
        aliases=tuple(names[1:]),
        _loader=load,
        _transposed=info.transposed,
        _meta=value.is_meta,
    )
