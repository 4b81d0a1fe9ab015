"""``for_model``: one optimizer object for a whole model.

The hidden weight matrices — ``nn.Linear``, ``nn.Conv1d``/``Conv2d`` and transformers'
``Conv1D`` layers, except the output head and any weight tied to an embedding — go to
the spectral method; everything else that trains (embeddings, the output head, norms,
biases, other parameters) goes to AdamW groups of the *same* optimizer, with their own
learning rate. A weight reached under several names (tied ``wte``/``lm_head``) is one
parameter and is routed once. ``targets=`` narrows the spectral share with the same
name patterns ``adapt`` and ``compress`` take (:mod:`spectrakit._targets`).

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
>>> opt = sk.optimize.for_model(model, "muon", lr=0.02)
>>> print(opt.describe())  # doctest: +NORMALIZE_WHITESPACE
muon (lr 0.02): 1 tensors, 64 parameters
  1.weight  (8, 8)
adamw (lr 0.0003): 4 tensors, 178 parameters
  0.weight  (10, 8)  embedding
  1.bias  (8,)  bias or norm
  2.weight  (10, 8)  output head
  2.bias  (10,)  bias or norm
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn

from .._targets import select_targets
from ..errors import SpectrakitError
from ..weights import iter_matrices
from ._base import ADAMW_DEFAULTS, MatrixOptimizer


def _methods() -> dict[str, tuple[Callable[..., MatrixOptimizer], float]]:
    from .galore import GaLore
    from .multinorm import MultiNormalized
    from .muon import Muon
    from .shampoo import Shampoo
    from .soap import SOAP

    return {"muon": (Muon, 0.02), "soap": (SOAP, 3e-3), "shampoo": (Shampoo, 1e-3), "galore": (GaLore, 1e-3),
            "multinorm": (MultiNormalized, 0.02), "adamw": (AdamWOnly, 3e-4)}


#: The names ``for_model`` takes.
METHODS = ("muon", "soap", "shampoo", "galore", "multinorm", "adamw")


class AdamWOnly(MatrixOptimizer):
    """Every parameter to AdamW (``for_model(model, "adamw")``, the baseline), in the same
    object type as the spectral methods so that ``describe()`` and the CLI treat it alike.

    Args:
        params: param groups (each stepped by AdamW).
        lr: learning rate.
        betas, eps, weight_decay: AdamW's.
    """

    def __init__(self, params: Any, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, **options: Any) -> None:
        if options:
            raise SpectrakitError(f"AdamW has no option {sorted(options)[0]!r}")
        groups = [dict(group, adamw=True) for group in params]
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def matrix_step(self, groups: list[dict[str, Any]]) -> None:
        """Nothing: every group is an AdamW group.

        Args:
            groups: always empty.
        """


@dataclass
class Route:
    """Where :func:`for_model` sent one parameter.

    Attributes:
        name: the parameter's name in the model (its first name, when tied).
        shape: its shape.
        method: where it went: the spectral method's name, or ``"adamw"``.
        reason: why it went to AdamW (``"embedding"``, ``"output head"``, ``"bias or norm"``, …).
        aliases: the parameter's other names (tied weights are stepped once).
    """

    name: str
    shape: tuple[int, ...]
    method: str
    reason: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _excluded_weights(model: nn.Module) -> dict[int, str]:
    """Matrices that are not hidden layers: the output head and embedding(-tied) weights."""
    excluded = {id(m.weight): "embedding" for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    get_output = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_output):
        try:
            head = get_output()
        except Exception:  # some models raise NotImplementedError here
            head = None
    if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        excluded.setdefault(id(head.weight), "output head")
    elif not callable(get_output):  # a plain model: its last matrix layer is the head
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(m)]
        if last and len(last) > 1:
            excluded.setdefault(id(last[-1].weight), "output head")
    return excluded


def _matches(name: str, pattern: str) -> bool:
    module = name.rpartition(".")[0]
    return any(form == pattern or form.endswith("." + pattern) or fnmatch.fnmatchcase(form, pattern)
               for form in (name, module))


def for_model(model: nn.Module, method: str, lr: float | None = None, *, adamw_lr: float = 3e-4,
              adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_weight_decay: float = 0.0,
              targets: str | Sequence[str] = "all-linear", other_matrices: bool = False,
              **options: Any) -> MatrixOptimizer:
    """One optimizer for ``model``: hidden matrices to ``method``, the rest to AdamW.

    Args:
        model: the model (any ``nn.Module``; Hugging Face models' output head is found by
            ``get_output_embeddings()`` (a headless one has none), a plain model's by being
            its last matrix layer).
        method: ``"muon"``, ``"soap"``, ``"shampoo"``, ``"galore"``, ``"multinorm"`` or
            ``"adamw"`` (everything to AdamW).
        lr: the spectral method's learning rate (default: the method's own).
        adamw_lr, adamw_betas, adamw_weight_decay: the AdamW groups' settings.
        targets: ``"all-linear"`` (every hidden matrix) or layer-name patterns, as for
            ``adapt`` and ``compress``; what they leave out goes to AdamW.
        other_matrices: also send trainable matrices that belong to no known layer (an
            adapter's factors, say) to the method.
        **options: the method's options (``momentum=``, ``rank=``, …).

    Returns:
        The optimizer; ``describe()`` prints the split.
    """
    if not isinstance(model, nn.Module):
        raise SpectrakitError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    methods = _methods()
    if method not in methods:
        raise SpectrakitError(f"optimizer method {method!r} is not one of {', '.join(METHODS)}")
    cls, default_lr = methods[method]
    lr = default_lr if lr is None else lr
    excluded = _excluded_weights(model)
    transposed_ids = {id(m.weight) for m in model.modules() if _is_hf_conv1d(m)}
    hidden: dict[str, torch.Tensor] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    for record in iter_matrices(model):
        aliases[record.name] = record.aliases
        if record.kind not in ("linear", "conv1d", "conv2d") and not (other_matrices and record.kind == "matrix"):
            continue
        try:
            param = model.get_parameter(record.name)
        except AttributeError:  # a parametrized weight: its `original` goes to AdamW
            continue
        if id(param) in excluded or not param.requires_grad:
            continue
        hidden[record.name] = param

    def miss(pattern: str) -> NoReturn:
        raise SpectrakitError(f"target {pattern!r} matches no hidden weight matrix of the model "
                              "(embeddings and the output head always go to AdamW)")

    chosen = {id(p) for p in select_targets(hidden, targets, verb="optimize", matches=_matches, on_miss=miss,
                                             all_linear=lambda layers: dict(layers)).values()}
    hidden_ids = {id(p) for p in hidden.values()}
    spectral: list[tuple[str, torch.Tensor]] = []
    spectral_transposed: list[tuple[str, torch.Tensor]] = []
    rest: list[tuple[str, torch.Tensor]] = []
    routes: list[Route] = []
    for name, param in model.named_parameters():  # each tied parameter once, under its first name
        if not param.requires_grad:
            continue
        if id(param) in chosen and method != "adamw":
            (spectral_transposed if id(param) in transposed_ids else spectral).append((name, param))
            routes.append(Route(name, tuple(param.shape), method, aliases=aliases.get(name, ())))
            continue
        if id(param) in excluded:
            reason = excluded[id(param)]
        elif param.ndim < 2:
            reason = "bias or norm"
        elif id(param) in chosen:
            reason = "hidden matrix"
        elif id(param) in hidden_ids:
            reason = "not in targets"
        else:
            reason = "other"
        rest.append((name, param))
        routes.append(Route(name, tuple(param.shape), "adamw", reason, aliases.get(name, ())))
    if not spectral and not spectral_transposed and method != "adamw":
        raise SpectrakitError(f"for_model: the model has no trainable hidden weight matrix for {method!r}")
    adamw_group = {"lr": adamw_lr, "betas": adamw_betas, "weight_decay": adamw_weight_decay,
                   "eps": ADAMW_DEFAULTS["eps"]}
    groups: list[dict[str, Any]] = []
    if spectral:
        groups.append({"params": spectral})
    if spectral_transposed:
        groups.append({"params": spectral_transposed, "transposed": True})
    if rest:
        groups.append({"params": rest, "adamw": True, **adamw_group, **({"lr": lr} if method == "adamw" else {})})
    if method == "adamw":  # options such as eps= apply to the one AdamW group
        unknown = set(options) - set(ADAMW_DEFAULTS)
        if unknown:
            raise SpectrakitError(f"for_model('adamw'): AdamW has no option {sorted(unknown)[0]!r}")
        groups[-1].update(options)
        options = {}
    try:
        optimizer: MatrixOptimizer = cls(groups, lr=lr, **options)
    except TypeError as error:  # an option the method does not have
        raise SpectrakitError(f"for_model({method!r}): {error}") from error
    optimizer.routes = routes
    return optimizer


def describe_routes(routes: list[Route], groups: list[dict[str, Any]]) -> str:
    """The split as text: one block per destination, one line per parameter."""
    lrs: dict[str, float] = {}
    for group in groups:
        lrs.setdefault("adamw" if group.get("adamw") else "spectral", group["lr"])
    lines = []
    for method in dict.fromkeys(route.method for route in sorted(routes, key=lambda r: r.method == "adamw")):
        mine = [route for route in routes if route.method == method]
        count = sum(int(torch.Size(route.shape).numel()) for route in mine)
        lr = lrs.get("adamw" if method == "adamw" else "spectral")
        lines.append(f"{method} (lr {lr:g}): {len(mine)} tensors, {count:,} parameters")
        for route in mine:
            extra = f"  {route.reason}" if route.reason else ""
            tied = f"  (tied: {', '.join(route.aliases)})" if route.aliases else ""
            lines.append(f"  {route.name}  {route.shape}{extra}{tied}")
    return "\n".join(lines)
