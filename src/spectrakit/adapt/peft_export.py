"""Export adapters to a folder that ``peft.PeftModel.from_pretrained`` loads.

Supported: ``lora`` (and rsLoRA), ``eva`` (per-layer ranks through PEFT's
``rank_pattern``/``alpha_pattern``), and the residual methods ``pissa``, ``milora``
and ``soma``, all as PEFT LoRA; ``fourierft`` as PEFT's own FourierFT (the same
frequencies: PEFT's ``random_loc_seed`` is our ``seed``) and ``hra`` as PEFT's own HRA
(``hra_u`` is our ``reflections`` transposed; PEFT's HRA wraps ``nn.Linear`` only).

PiSSA-style adapters are **converted to a plain LoRA on the original weight**, as PEFT's
``path_initial_model_for_weight_conversion`` does, so the folder applies to the
unmodified base model and no residual weights need to be shipped. The adapted layer is
``W_res + s·B A`` with ``W_res = W − s·B₀ A₀``, i.e. ``W + s·(B A − B₀ A₀)``, which is a
LoRA of rank ``2r``:

    A' = [A; A₀],   B' = [B, −B₀],   α' = 2α   (so that α'/2r = α/r).

The initial factors ``A₀, B₀`` are kept by the adapter for exactly this purpose.

Only the standard library, torch and safetensors are needed; peft itself is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_save_path, atomic_write
from ..errors import SpectrakitError
from .base import adapted_layers

EXPORTABLE = ("lora", "eva", "pissa", "milora", "soma", "fourierft", "hra")
_RESIDUAL = ("pissa", "milora", "soma")


def _lora_factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``(A', B', alpha', r')`` of a plain LoRA equal to ``layer``'s update of the *original* weight."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if layer.method in _RESIDUAL:
        A = torch.cat([A, layer.A0], dim=0)
        B = torch.cat([B, -layer.B0], dim=1)
        return A, B, 2 * layer.alpha, 2 * layer.rank
    return A, B, layer.alpha, layer.rank


def export_peft(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for PEFT.

    Args:
        model: a model adapted by :func:`spectrakit.adapt`.
        folder: the folder to write (created; each file written atomically).

    >>> sk.export_peft(model, "peft-adapter")                          # doctest: +SKIP
    >>> peft.PeftModel.from_pretrained(base_model, "peft-adapter")     # doctest: +SKIP

    For ``pissa``/``milora``/``soma``, ``base_model`` is the *original* model (before
    :func:`spectrakit.adapt` replaced its weights by residuals); see the module docstring.
    """
    layers = adapted_layers(model)
    if not layers:
        raise SpectrakitError("export_peft: the model has no spectrakit adapters")
    methods = {layer.method for layer in layers.values()}
    unsupported = sorted(methods - set(EXPORTABLE))
    if unsupported:
        raise SpectrakitError(f"export_peft: method {unsupported[0]!r} has no PEFT equivalent "
                              f"(exportable: {', '.join(EXPORTABLE)})")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if methods & {"fourierft", "hra"}:
        if len(methods) > 1:
            raise SpectrakitError(f"export_peft: the model mixes methods {sorted(methods)}; PEFT holds one per folder")
        own_tensors, own_config = (_fourierft(layers) if "fourierft" in methods else _hra(layers))
        return _write(folder, own_tensors, own_config)
    rslora = {bool(getattr(layer, "rslora", False)) for layer in layers.values()}
    if len(rslora) > 1:
        raise SpectrakitError("export_peft: the model mixes LoRA and rsLoRA scaling")
    for name, layer in layers.items():
        A, B, alpha, rank = _lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to("cpu").contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to("cpu").contiguous().clone()
        ranks[name], alphas[name] = rank, alpha
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    default_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": default_rank,
        "lora_alpha": default_alpha,
        "use_rslora": rslora.pop(),
        "target_modules": sorted(layers),
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != default_alpha},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "spectrakit_method": methods.pop() if len(methods) == 1 else sorted(methods),
    }
    return _write(folder, tensors, config)


def _write(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_save_path(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_write(folder / "adapter_config.json") as handle:
        json.dump(config, handle, indent=2)
    return folder


def _common(layers: dict[str, Any], peft_type: str) -> dict[str, Any]:
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None,
            "target_modules": sorted(layers), "inference_mode": True, "modules_to_save": None,
            "bias": "none", "layers_to_transform": None, "layers_pattern": None}


def _fourierft(layers: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT FourierFT: ``fourierft_spectrum`` per layer; one seed and scaling for the folder."""
    seeds = {layer.seed for layer in layers.values()}
    scalings = {layer.scaling for layer in layers.values()}
    if len(seeds) > 1 or len(scalings) > 1:
        raise SpectrakitError("export_peft: PEFT's FourierFT takes one seed and one scaling per folder; "
                              "the layers differ")
    counts = {name: layer.n_frequencies for name, layer in layers.items()}
    default = max(set(counts.values()), key=list(counts.values()).count)
    tensors = {f"base_model.model.{name}.fourierft_spectrum": layer.coefficients.detach().to("cpu").clone()
               for name, layer in layers.items()}
    config = {**_common(layers, "FOURIERFT"), "n_frequency": default,
              "n_frequency_pattern": {n: c for n, c in counts.items() if c != default},
              "scaling": scalings.pop(), "random_loc_seed": seeds.pop(),
              "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
              "init_weights": False, "spectrakit_method": "fourierft"}
    return tensors, config


def _hra(layers: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT HRA: ``hra_u`` (``in × r``) per layer, without Gram–Schmidt."""
    for name, layer in layers.items():
        if layer.fan_in_fan_out:
            raise SpectrakitError(f"export_peft: PEFT's HRA wraps nn.Linear only; layer {name} is a Conv1D")
    ranks = {layer.rank for layer in layers.values()}
    if len(ranks) > 1:
        raise SpectrakitError("export_peft: PEFT's HRA takes one rank per folder; the layers differ")
    tensors = {f"base_model.model.{name}.hra_u": layer.reflections.detach().T.to("cpu").contiguous().clone()
               for name, layer in layers.items()}
    config = {**_common(layers, "HRA"), "r": ranks.pop(), "apply_GS": False, "init_weights": True,
              "spectrakit_method": "hra"}
    return tensors, config
