"""MoDeGPT's type-I module (Lin et al., 2024): the MLP pair by Nyström approximation.

**Only the MLP pair is implemented.** MoDeGPT also compresses the Q·K pair by CR
decomposition and the V·O pair by SVD; both change the attention heads' widths, which
needs an attention forward of our own, and are not done: ``modules=`` accepts only
``("mlp",)`` and the attention layers are left dense.

An MLP computes ``y = h(x) W_dᵀ`` with ``h(x) = σ(x W_gᵀ) ⊙ (x W_uᵀ)`` (Llama-style, gated)
or ``h(x) = σ(x W_fcᵀ + b)`` (GPT-2-style); each of its ``m`` intermediate neurons is one
column of ``h``. With ``C = Σ hᵀh`` over the calibration tokens (``m × m``), keep the ``k``
neurons of the largest ridge leverage scores and rebuild the down-projection from them
(the Nyström approximation of ``C``):

.. math::  s = \\mathrm{diag}\\big(C (C + \\lambda I)^{-1}\\big), \\qquad
           W_d' = W_d \\, C_{:,S} \\, (C_{S,S} + \\epsilon I)^{-1}

``W_g``, ``W_u`` (or ``W_fc``, ``b``) keep their rows ``S``. ``W_d'`` is the least-squares
down-projection from the kept neurons on the calibration tokens, so at ``k = m`` the MLP
is reproduced (up to the tiny ``ε = 1e-10 · mean diag C``). ``λ = damping · mean diag C``
(default ``1e-2``). With ``ratio=ρ``, every MLP keeps ``k = ⌊(1 − ρ)·m⌋`` neurons, which
removes the fraction ρ of its three (two) matrices' weights up to rounding.

>>> import torch, spectrakit as sk, transformers
>>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32,
...     intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
>>> report = sk.compress(model, method="modegpt", ratio=0.25, calibration=[torch.randint(0, 100, (4, 16))])
>>> report.layers["model.layers.0.mlp.down_proj"].rank
48
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from .._targets import layer_weight, module_sites, replace_module
from ..errors import SpectrakitError
from .api import CompressionReport, LayerReport, _output_head, count_parameters
from .calibration import collect_statistics

LAYOUTS = {"gated": ("gate_proj", "up_proj", "down_proj"), "gpt2": ("c_fc", "c_proj")}
SUPPORTED = ("Llama-style MLPs (gate_proj, up_proj, down_proj: Llama, Mistral, Qwen2) and GPT-2-style MLPs "
             "(c_fc, c_proj)")


def find_mlps(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every MLP block ``model`` holds, by module name, with its layout (``"gated"`` or ``"gpt2"``).

    Args:
        model: the model; an MLP is a module with the layout's children as its linear layers.
    """
    blocks = {}
    for name, module in model.named_modules():
        for layout, children in LAYOUTS.items():
            if all(isinstance(getattr(module, child, None), nn.Module) for child in children):
                blocks[name] = (layout, module)
    return blocks


def _weight(layer: nn.Module) -> torch.Tensor:
    """``out × in`` of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``in × out``)."""
    weight = layer_weight(layer)
    return weight.detach() if isinstance(layer, nn.Linear) else weight.detach().T


def _narrowed(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A layer of ``layer``'s kind holding ``weight`` (``out × in``) and ``bias``."""
    old = layer_weight(layer)
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=old.device,
                                   dtype=old.dtype)
        stored = weight
    else:  # transformers Conv1D(nf, nx) stores nx × nf
        new = type(layer)(weight.shape[0], weight.shape[1]).to(device=old.device, dtype=old.dtype)
        stored = weight.T
    with torch.no_grad():
        layer_weight(new).copy_(stored)
        if bias is not None:
            cast(torch.Tensor, new.bias).copy_(bias)  # built with a bias just above
    return new


def nystrom_selection(correlation: torch.Tensor, keep: int, damping: float = 1e-2) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """``(S, M)``: the ``keep`` neurons of largest ridge leverage score (sorted) and the
    ``m × k`` map with ``W_d' = W_d M`` (``M = C_{:,S} (C_{S,S} + εI)⁻¹``), in float64.

    Args:
        correlation: ``C = Σ hᵀh`` (``m × m``).
        keep: ``k``, the neurons to keep.
        damping: ``λ / mean diag C`` of the leverage scores.
    """
    C = correlation.double()
    scale = float(C.diagonal().mean())
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    scores = torch.linalg.solve(C + damping * scale * eye, C).diagonal()  # diag(C(C+λI)⁻¹), C symmetric
    selected = torch.sort(torch.topk(scores, keep).indices).values
    block = C[selected][:, selected] + 1e-10 * scale * torch.eye(keep, dtype=C.dtype, device=C.device)
    mapping = torch.linalg.solve(block, C[selected]).T  # C_{:,S} C_{S,S}⁻¹ (C_{S,S} symmetric)
    return selected, mapping


def compress_modegpt(model: nn.Module, *, ratio: float | None, rank: int | None, energy: float | None,
                     calibration: Iterable[Any] | None, allocation: str | None, start: float,
                     modules: tuple[str, ...] = ("mlp",), damping: float = 1e-2, progress: bool = False,
                     **options: Any) -> CompressionReport:
    """``method="modegpt"`` for :func:`~spectrakit.compress.compress` (the module docstring).

    Args:
        model: a model with Llama- or GPT-2-style MLP blocks.
        ratio: the fraction of each MLP's weights to remove (``rank=k``: keep ``k`` neurons).
        rank, energy, allocation: ``energy`` and non-uniform allocations are refused.
        calibration: batches the model is run on.
        start: ``time.perf_counter()`` when the call began.
        modules: the pairs to compress; only ``("mlp",)`` is implemented.
        damping: the leverage scores' ridge, relative to ``mean diag C``.
        progress: a progress bar over the calibration batches.
        options: anything else, refused.
    """
    if options:
        raise SpectrakitError(f"method 'modegpt': bad option ({', '.join(options)})")
    if tuple(modules) != ("mlp",):
        raise SpectrakitError(f"modegpt: modules={tuple(modules)!r}: only ('mlp',) is implemented "
                              "(the Q·K and V·O pairs are not)")
    if energy is not None or allocation not in (None, "uniform"):
        raise SpectrakitError("method 'modegpt' takes ratio= or rank= with allocation='uniform'")
    if (ratio is None) == (rank is None):
        raise SpectrakitError("compress: give exactly one of ratio= or rank= for method 'modegpt'")
    if ratio is not None and not 0 < ratio < 1:
        raise SpectrakitError(f"ratio={ratio!r} must be in (0, 1): the fraction of the targeted weights to remove")
    if not damping > 0:
        raise SpectrakitError(f"modegpt: damping={damping!r} must be > 0")
    blocks = find_mlps(model)
    if not blocks:
        raise SpectrakitError(f"modegpt: {type(model).__name__} has no MLP block of a known layout; "
                              f"supported: {SUPPORTED}")
    if calibration is None:
        raise SpectrakitError("method 'modegpt' needs calibration=batches (inputs the model is run on)")
    downs = {f"{name}.{LAYOUTS[layout][-1]}": getattr(block, LAYOUTS[layout][-1])
             for name, (layout, block) in blocks.items()}
    parameters_before = count_parameters(model)
    calibration_start = time.perf_counter()
    statistics = collect_statistics(model, downs, calibration, gram=True, head=_output_head(model), progress=progress)
    calibration_seconds = time.perf_counter() - calibration_start
    sites = module_sites(model)
    layers: dict[str, LayerReport] = {}
    for name, (layout, block) in blocks.items():
        children = LAYOUTS[layout]
        down_name = f"{name}.{children[-1]}"
        down = getattr(block, children[-1])
        width = _weight(down).shape[1]
        keep = max(1, min(width, math.floor((1 - ratio) * width) if ratio is not None else int(rank or 1)))
        stats = statistics[down_name]
        assert stats.gram is not None
        if not float(stats.gram.diagonal().sum()) > 0:
            raise SpectrakitError(f"modegpt: the MLP neurons of {name} never fire on the calibration data")
        selected, mapping = nystrom_selection(stats.gram, keep, damping)
        for child in children:
            layer = getattr(block, child)
            W = _weight(layer)
            bias = getattr(layer, "bias", None)
            bias = bias.detach() if isinstance(bias, torch.Tensor) else None
            if child == children[-1]:  # the down-projection: W_d M
                new_weight, new_bias = (W.double() @ mapping.to(W.device)).to(W.dtype), bias
            else:  # the up side keeps its rows S (and their biases)
                new_weight = W[selected.to(W.device)]
                new_bias = None if bias is None else bias[selected.to(bias.device)]
            replace_module(model, sites[id(layer)], _narrowed(layer, new_weight, new_bias))
            out_features, in_features = W.shape
            layers[f"{name}.{child}"] = LayerReport(
                out_features=out_features, in_features=in_features, rank=keep, full_rank=width, replaced=True,
                parameters_before=W.numel(), parameters_after=new_weight.numel(), truncation_loss=0.0,
                relative_loss=0.0)
    target_before = sum(layer.parameters_before for layer in layers.values())
    target_after = sum(layer.parameters_after for layer in layers.values())
    budget = {"ratio": ratio, "rank": rank, "damping": damping}
    return CompressionReport(
        method="modegpt", allocation="uniform", budget={k: v for k, v in budget.items() if v is not None},
        parameters_before=parameters_before, parameters_after=count_parameters(model),
        target_parameters_before=target_before, target_parameters_after=target_after, layers=layers,
        calibration_tokens=max((s.tokens for s in statistics.values()), default=0),
        seconds=time.perf_counter() - start, calibration_seconds=calibration_seconds)
