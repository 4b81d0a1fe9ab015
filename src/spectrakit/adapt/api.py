"""``adapt`` / ``merge`` / ``save_adapter`` / ``load_adapter`` and friends.

>>> import torch, spectrakit as sk
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> x = torch.randn(4, 16)
>>> before = model(x)
>>> _ = sk.adapt(model, "pissa", rank=4)
>>> sk.trainable_parameters(model)            # 4·(32+16) + 4·(8+32)
352
>>> torch.allclose(model(x), before, atol=1e-5)
True
>>> _ = sk.merge(model)
>>> type(model[0]).__name__
'Linear'
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_save_path
from .._targets import check_weight, layer_weight, module_sites, replace_module
from ..cache import SpectrumCache, as_cache, use_cache
from ..errors import SpectrakitError
from .base import adapted_layers, building, find_targets, fingerprint, get_method, is_conv1d, tied_names
from .distributed import build_adapters

FORMAT = "spectrakit-adapter"
FORMAT_VERSION = 1
_METADATA_KEY = "spectrakit_adapter"


def adapt(model: nn.Module, method: str, rank: int = 8, targets: str | list[str] = "all-linear", *,
          distributed: bool | None = None, cache: SpectrumCache | str | os.PathLike[str] | None = None,
          **options: Any) -> nn.Module:
    """Wrap the ``targets`` layers of ``model`` with the ``method`` adapter, in place.

    Every other parameter of the model is frozen; only the adapters train.

    Args:
        model: any module with ``nn.Linear`` or transformers ``Conv1D`` layers.
        method: one of :func:`spectrakit.adapt.methods` (``"lora"``, ``"pissa"``, …).
        rank: the method's size (low-rank width, number of singular values, …).
        targets: ``"all-linear"`` (all but the output head) or layer-name patterns.
        distributed: under ``torchrun`` (``None``, the default, when ``WORLD_SIZE > 1``; ``True`` to
            insist) each rank computes the SVD initialization of its share of the layers and every
            rank receives all of them (:mod:`spectrakit.adapt.distributed`); ``False``: one process.
        cache: a :class:`~spectrakit.SpectrumCache` or its folder: the singular triplets the
            SVD-initialized methods start from (PiSSA, MiLoRA, SVFit, SVFT, SORSA, SALT, SoDA,
            the spectral adapters: ``AdaptedLinear.factors``) are read from it when this very
            weight was decomposed before (same bytes, dtype, ``svd_method``, adapter dtype, as
            many triplets or more), else computed and written there; a cached run builds the
            adapters of the run that filled it, bit for bit. Methods that take no SVD of the
            weight ignore it. ``None``: the cache of an enclosing
            :func:`spectrakit.cache.use_cache` block, if any.
        **options: method options (e.g. ``alpha=16`` for LoRA, ``pattern="banded"`` for SVFT).

    Returns:
        ``model`` itself.
    """
    cls = get_method(method)
    cache = as_cache(cache)  # a bad cache= is refused before the model is touched
    plan_override = options.pop("_plan", None)  # load_adapter: the saved per-layer options
    cls.check_options(options)
    layers = find_targets(model, targets)
    plan = plan_override if plan_override is not None else cls.plan(model, layers, rank, options)
    tied = tied_names(model)
    for name, kwargs in plan.items():
        check_weight(name, layers[name])
        weight = layer_weight(layers[name])
        if cls.rewrites_base and len(tied.get(id(weight), ())) > 1:
            other = next(n for n in tied[id(weight)] if n != f"{name}.weight")
            raise SpectrakitError(f"layer {name}: its weight is tied to {other}, and {method!r} rewrites the base "
                                  "weight; untie it or choose a method that keeps it (lora, svfit, …)")
        out_f, in_f = (weight.shape[1], weight.shape[0]) if is_conv1d(layers[name]) else weight.shape
        cls.check_layer(name, int(out_f), int(in_f), kwargs)

    # remembered once, so that merge() can give frozen parameters their old flag back
    model.__dict__.setdefault("_spectrakit_requires_grad",
                              {n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    sites = module_sites(model)
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        with building(layers[name]):  # a cache hit reuses the constructor's hash of the weight
            return cls(layers[name], name=name, **kwargs)

    with contextlib.nullcontext() if cache is None else use_cache(cache):  # AdaptedLinear.factors reads it
        shared = build_adapters(build, layers, plan, rewrites_base=cls.rewrites_base, distributed=distributed)
        for name, kwargs in plan.items():
            adapter = shared[name] if shared is not None else build(name, kwargs)
            replace_module(model, sites[id(layers[name])], adapter)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Write every adapter into its layer's plain weight and put the original layer back.

    After ``merge`` the model has its original module types and exactly the base
    model's inference cost. Parameters frozen by :func:`adapt` get their old
    ``requires_grad`` back.
    """
    layers = adapted_layers(model)
    if not layers:
        raise SpectrakitError("merge: the model has no spectrakit adapters")
    sites = module_sites(model)
    for layer in layers.values():
        replace_module(model, sites[id(layer)], layer.restore())
    saved = model.__dict__.pop("_spectrakit_requires_grad", None)
    if saved is not None:
        for n, p in model.named_parameters():
            if n in saved:
                p.requires_grad_(saved[n])
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (parameters with ``requires_grad``, shared ones once).

    Args:
        model: any module.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def adapter_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of the adapters' own regularizers (SORSA's and HRA's orthonormality terms).

    Add it to the loss with a weight of your choice; it is ``0`` for methods without one.

    Args:
        model: a model adapted by :func:`spectrakit.adapt`.
    """
    terms = [t for layer in adapted_layers(model).values() if (t := layer.penalty()) is not None]
    if not terms:
        param = next(iter(model.parameters()), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([t.float() for t in terms]).sum()


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able description of a model's adapters (what ``save_adapter`` stores)."""
    layers = adapted_layers(model)
    if not layers:
        raise SpectrakitError("the model has no spectrakit adapters; call spectrakit.adapt first")
    methods = {layer.method for layer in layers.values()}
    if len(methods) > 1:
        raise SpectrakitError(f"the model mixes adapter methods {sorted(methods)}; save them one at a time")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": methods.pop(),
        "layers": {name: layer.config() for name, layer in layers.items()},
        "fingerprints": {name: layer.base_fingerprint for name, layer in layers.items()},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the adapters' trainable tensors and their config to one ``.safetensors`` file.

    The file's metadata holds the method, the per-layer options and a SHA-256
    fingerprint of every base weight as it was before adaptation, so that
    :func:`load_adapter` can refuse a different base model. Written atomically.

    Args:
        model: a model adapted by :func:`spectrakit.adapt`.
        path: the ``.safetensors`` file to write.
    """
    from safetensors.torch import save_file

    config = adapter_config(model)
    tensors = {}
    for name, layer in adapted_layers(model).items():
        for key, value in layer.trainable().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").clone().contiguous()
    path = Path(path)
    with atomic_save_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(config)})
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a file written by :func:`save_adapter`.

    Args:
        path: the adapter's ``.safetensors`` file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpectrakitError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors has its own error types
        raise SpectrakitError(f"cannot read adapter file {path}: {str(error).splitlines()[0]}") from error
    if _METADATA_KEY not in metadata:
        raise SpectrakitError(f"{path} is not a spectrakit adapter (no '{_METADATA_KEY}' metadata)")
    try:
        config = json.loads(metadata[_METADATA_KEY])
    except ValueError as error:
        raise SpectrakitError(f"{path}: corrupt adapter config ({error})") from error
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise SpectrakitError(f"{path}: unsupported adapter format {config.get('format')!r} "
                              f"version {config.get('version')!r}")
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Restore adapters saved by :func:`save_adapter` into ``model`` (in place; returns it).

    ``model`` is either the plain base model (the adapters are created first, with the
    saved options) or a model already adapted the same way. Either way every base
    weight must be bitwise the one the adapter was trained on; a mismatch raises a
    :class:`SpectrakitError` naming the first differing layer.

    Args:
        model: the plain base model, or the same model already adapted the same way.
        path: the file :func:`save_adapter` wrote.
    """
    config, tensors = read_adapter(path)
    method, plan, fingerprints = config["method"], config["layers"], config["fingerprints"]
    existing = adapted_layers(model)
    if existing:
        if set(existing) != set(plan) or any(layer.method != method for layer in existing.values()):
            raise SpectrakitError(f"{path}: the model's adapters differ from the saved {method!r} adapters; "
                                  "load into the plain base model instead")
        for name, layer in existing.items():
            if layer.base_fingerprint != fingerprints[name]:
                raise SpectrakitError(f"{path}: base weight of layer {name} differs from the one the adapter "
                                      "was trained on")
    else:
        modules = dict(model.named_modules())
        for name, expected in fingerprints.items():
            module = modules.get(name)
            if module is None or not hasattr(module, "weight"):
                raise SpectrakitError(f"{path}: the model has no layer {name}")
            if fingerprint(layer_weight(module)) != expected:
                raise SpectrakitError(f"{path}: base weight of layer {name} differs from the one the adapter "
                                      "was trained on")
        adapt(model, method, targets=list(plan), _plan={n: dict(k) for n, k in plan.items()})
    _copy_tensors(model, tensors, path)
    return model


@torch.no_grad()
def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Any) -> None:
    expected: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model).items():
        for key, param in layer.trainable().items():
            expected[f"{name}.{key}"] = param
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise SpectrakitError(f"{path}: {what}")
    for key, target in expected.items():
        value = tensors[key]
        if value.shape != target.shape:
            raise SpectrakitError(f"{path}: tensor {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
