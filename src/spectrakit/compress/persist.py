"""Save a compressed model as safetensors plus JSON, and rebuild it offline.

A folder written by :func:`save_compressed` holds:

* ``model.safetensors`` — the whole state dict (tied tensors stored once), or shards and
  ``model.safetensors.index.json`` when ``compress(folder, low_memory=True)`` wrote it;
* ``compress.json`` — the format tag, each :class:`LowRankLinear`'s name, shape, rank,
  bias and method (each structured layer's structure and blocks; each layer MoDeGPT
  narrowed, with its new widths, which the model's config no longer states), the compression
  report when given, and how to rebuild the model: a Hugging Face class name from
  ``transformers`` (no remote code) or ``"module"``;
* ``config.json`` — the Hugging Face config, for a Hugging Face model.

:func:`load_compressed` rebuilds a Hugging Face model from ``config.json`` with
``transformers`` (nothing is downloaded), swaps in the low-rank layers and loads the
state. Any other model is rebuilt into the skeleton passed as ``model=``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_save_path, atomic_write
from .._shards import INDEX, load_shards, shard_files
from .._targets import layer_weight, module_sites, replace_module
from ..errors import SpectrakitError
from ..weights.checkpoint import _parameters_on_meta
from ..weights.files import safetensors_dtypes
from .api import CompressionReport
from .lowrank import LowRankLinear
from .narrow_attention import NarrowAttention
from .structured import BlockTensorTrainLinear, MonarchLinear

FORMAT = "spectrakit-compressed"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "compress.json"
HF_CONFIG = "config.json"


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                            "bias": m.bias is not None, "method": m.method}
        elif isinstance(m, BlockTensorTrainLinear):
            layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                            "bias": m.bias is not None, "method": m.kind, "structure": m.kind, "blocks": m.blocks}
        elif isinstance(m, NarrowAttention):
            layers[name] = {"kind": "narrow-attention", "method": "modegpt", **m.spec()}
        elif getattr(m, "narrowed_by", None) is not None:  # an MLP layer modegpt made narrower
            weight = layer_weight(m)
            out_features, in_features = weight.shape if isinstance(m, nn.Linear) else weight.shape[::-1]
            layers[name] = {"kind": "linear" if isinstance(m, nn.Linear) else "conv1d", "in_features": in_features,
                            "out_features": out_features, "bias": getattr(m, "bias", None) is not None,
                            "method": m.narrowed_by}
    return layers


def _hf_class(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    module = type(model).__module__
    if config is None or not module.startswith("transformers") or not hasattr(config, "to_dict"):
        return None
    return type(model).__name__


def save_compressed(model: nn.Module, path: str | os.PathLike, report: CompressionReport | None = None) -> Path:
    """Write ``model`` (compressed by :func:`compress`) to the folder ``path``, atomically
    file by file; returns the folder.

    Args:
        model: the compressed model.
        path: the folder to write.
        report: the :class:`CompressionReport`, saved beside the weights.
    """
    from safetensors.torch import save_model

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SpectrakitError(f"{folder} exists and is not a folder")
    layers = _layers(model)
    hf_class = _hf_class(model)
    # buffers the state dict leaves out (e.g. rotary frequencies) keep their dtype through this
    buffers = {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers() if b.is_floating_point()}
    meta = {"format": FORMAT, "version": VERSION, "architecture": hf_class or "module", "layers": layers,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "buffer_dtypes": buffers,
            "report": report.to_dict() if report is not None else None}
    if hf_class is not None:
        config: Any = model.config  # a transformers PretrainedConfig (see _hf_class)
        with atomic_write(folder / HF_CONFIG) as handle:
            handle.write(config.to_json_string(use_diff=False))
    with atomic_save_path(folder / WEIGHTS) as tmp:
        # save_model drops the second name of tied tensors and load_model restores them
        save_model(model, str(tmp), metadata={"format": FORMAT})
    with atomic_write(folder / CONFIG) as handle:  # written last: its presence means a complete folder
        json.dump(meta, handle, indent=2)
    return folder


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``compress.json`` of a saved folder, checked.

    Args:
        path: the folder :func:`save_compressed` wrote.
    """
    file = Path(path) / CONFIG
    if not file.is_file():
        raise SpectrakitError(f"{Path(path)}: no {CONFIG}; not a folder written by spectrakit save_compressed")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpectrakitError(f"{file}: cannot read ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise SpectrakitError(f"{file}: not a spectrakit compressed-model config")
    if meta.get("version", 0) > VERSION:
        raise SpectrakitError(f"{file}: format version {meta['version']} is newer than this spectrakit")
    return meta


def _build_hf(folder: Path, class_name: str, on_meta: bool = False) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise SpectrakitError("loading a compressed Hugging Face model needs transformers: "
                              "pip install 'spectrakit[hf]'") from None
    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SpectrakitError(f"{folder / CONFIG}: architecture {class_name!r} is not a transformers model class")
    if cls.config_class is None:
        raise SpectrakitError(f"{folder / CONFIG}: architecture {class_name!r} has no transformers config class")
    try:
        config_dict = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
        config = cls.config_class.from_dict(config_dict)
    except (OSError, ValueError, TypeError) as error:
        raise SpectrakitError(f"{folder / HF_CONFIG}: cannot read the model config ({error})") from None
    # the throw-away init must not move the caller's RNG; on_meta: no memory and no init at
    # all (buffers stay real), for a sharded folder whose tensors are then assigned in place
    with torch.random.fork_rng(devices=[]), _parameters_on_meta() if on_meta else contextlib.nullcontext():
        return cls(config)


def _narrow_layer(folder: Path, name: str, old: nn.Module, spec: dict[str, Any], model: nn.Module,
                  device: torch.device, dtypes: dict[str, torch.dtype]) -> nn.Module:
    """A layer MoDeGPT narrowed, rebuilt empty from its ``compress.json`` entry."""
    kind = spec["kind"]
    try:
        if kind == "narrow-attention":
            arguments = {k: v for k, v in spec.items() if k not in ("kind", "method")}
            new: nn.Module = nn.utils.skip_init(NarrowAttention, **arguments, config=getattr(model, "config", None),
                                                device=device, dtype=dtypes.get(f"{name}.q_proj.weight"))
        elif kind == "linear":
            new = nn.utils.skip_init(nn.Linear, spec["in_features"], spec["out_features"], bias=spec["bias"],
                                     device=device, dtype=dtypes.get(f"{name}.weight"))
        elif kind == "conv1d":  # transformers' Conv1D(nf=out, nx=in), the class the model had there
            new = type(old)(spec["out_features"], spec["in_features"]).to(device=device,
                                                                          dtype=dtypes.get(f"{name}.weight"))
        else:
            raise SpectrakitError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, SpectrakitError) as error:
        raise SpectrakitError(f"{folder / CONFIG}: layer {name}: cannot rebuild it ({error})") from None
    if kind != "narrow-attention":
        new.narrowed_by = spec.get("method", "modegpt")  # saved again as narrowed
    return new


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`, in eval mode.

    Args:
        path: the folder.
        model: for a model that is not from transformers, a freshly built instance of
            the original (dense) architecture; its layers are replaced and its state loaded.
    """
    from safetensors.torch import load_model

    folder = Path(path)
    meta = read_config(folder)
    sharded = not (folder / WEIGHTS).is_file() and (folder / INDEX).is_file()
    built = False  # a model built here from a sharded folder: on the meta device, its tensors assigned
    if model is None:
        if meta["architecture"] == "module":
            raise SpectrakitError(f"{folder}: a plain torch model; pass model= (the dense architecture) to rebuild it")
        model = _build_hf(folder, meta["architecture"], on_meta=sharded)
        built = sharded
    weights = folder / WEIGHTS
    if not weights.is_file() and not (folder / INDEX).is_file():
        raise SpectrakitError(f"{folder}: {WEIGHTS} is missing")
    # one file, or shards and their index (as low_memory=True writes them)
    files = [weights] if weights.is_file() else shard_files(folder / INDEX)
    dtypes = {name: dtype for file in files for name, dtype in safetensors_dtypes(file).items()
              if dtype.is_floating_point}
    recorded = meta.get("buffer_dtypes")
    for name, dtype in (recorded if isinstance(recorded, dict) else {}).items():
        if name not in dtypes and isinstance(getattr(torch, str(dtype), None), torch.dtype):
            dtypes[name] = getattr(torch, str(dtype))
    sites = module_sites(model)
    for name, spec in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SpectrakitError(f"{folder / CONFIG}: layer {name} does not exist in the model") from None
        parameter = next(iter(old.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        # no random init: every factor is loaded below (strict)
        new: nn.Module
        structure, kind = spec.get("structure"), spec.get("kind")
        if kind is not None:
            new = _narrow_layer(folder, name, old, spec, model, device, dtypes)
        elif structure is not None:
            cls = {"monarch": MonarchLinear, "btt": BlockTensorTrainLinear}.get(structure)
            if cls is None:
                raise SpectrakitError(f"{folder / CONFIG}: layer {name} has an unknown structure {structure!r}")
            try:
                new = nn.utils.skip_init(cls, spec["in_features"], spec["out_features"], spec["blocks"], spec["rank"],
                                         bias=spec["bias"], device=device, dtype=dtypes.get(f"{name}.left"))
            except SpectrakitError as error:
                raise SpectrakitError(f"{folder / CONFIG}: layer {name}: {error}") from None
        else:
            new = nn.utils.skip_init(LowRankLinear, spec["in_features"], spec["out_features"], spec["rank"],
                                     bias=spec["bias"], method=spec.get("method", ""), device=device,
                                     dtype=dtypes.get(f"{name}.up"))
        replace_module(model, sites[id(old)], new)
    # each tensor takes its saved dtype (a model may keep some layers in float32), in place,
    # so that tied parameters stay one tensor
    with torch.no_grad():
        for key, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if key in dtypes and tensor.dtype != dtypes[key]:
                tensor.data = tensor.data.to(dtypes[key])
    try:
        if weights.is_file():
            load_model(model, str(weights), strict=True)
        else:
            load_shards(model, files, assign=built)
    except SpectrakitError:
        raise
    except Exception as error:  # safetensors and load_state_dict raise their own types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpectrakitError(f"{weights}: does not match {CONFIG} ({first})") from None
    return model.eval()
