"""MoDeGPT (Lin et al., 2024): module-level decomposition of Llama- and GPT-2-style blocks.

Each block is split into three pairs of matrices that meet at one hidden width, and each
pair's width is shrunk so that the pair's output on the calibration data is rebuilt: the
MLP pair (type I) by a Nyström approximation (below), the Q·K pair (type II) by CR
decomposition and the V·O pair (type III) by SVD (both in
:mod:`spectrakit.compress.modegpt_attention`; the attention layer becomes a
:class:`~spectrakit.compress.narrow_attention.NarrowAttention`). ``modules=`` picks the pairs
(default ``("mlp", "qk", "vo")``). No layer becomes two: every matrix just gets narrower.

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
removes the fraction ρ of its three (two) matrices' weights up to rounding; the Q·K and
V·O pairs keep ``⌊(1 − ρ)·d⌋`` of each head's ``d`` dimensions (Q·K an even number with
rotary embeddings), so every pair, and the whole, loses the fraction ρ up to rounding.
``rank=k`` keeps ``min(k, width)`` dimensions of every pair instead.

>>> import torch, spectrakit as sk, transformers
>>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32,
...     intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
>>> report = sk.compress(model, method="modegpt", ratio=0.25, calibration=[torch.randint(0, 100, (4, 16))])
>>> report.layers["model.layers.0.mlp.down_proj"].rank, report.layers["model.layers.0.self_attn.q_proj"].rank
(48, 12)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from .._targets import layer_weight, module_sites, replace_module
from ..errors import SpectrakitError
from .api import CompressionReport, LayerReport, _output_head, count_parameters
from .base import CompressionWarning
from .calibration import collect_statistics
from .modegpt_attention import (
    ATTENTION_SUPPORTED,
    OutputSquares,
    find_attention,
    narrow,
    out_in,
    query_key_selection,
    value_output_factors,
)

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
    new.narrowed_by = "modegpt"  # type: ignore[assignment]  # save_compressed records its width (the model's config states the dense one)
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


PAIRS = ("mlp", "qk", "vo")


def _keep(width: int, ratio: float | None, rank: int | None, step: int = 1) -> int:
    """The dimensions a pair of width ``width`` keeps: ``⌊(1 − ratio)·width⌋`` or ``min(rank, width)``,
    rounded down to a multiple of ``step`` (2 for rotary pairs), at least ``step``."""
    wanted = math.floor((1 - ratio) * width) if ratio is not None else min(int(rank or 1), width)
    return max(step, min(width, wanted) // step * step)


def _pair_reports(name: str, children: dict[str, tuple[torch.Tensor, int]], rank: int, width: int,
                  loss: float = 0.0, total: float = 0.0) -> dict[str, LayerReport]:
    """One :class:`LayerReport` per matrix of a pair: ``{child: (dense out × in weight, weights after)}``."""
    return {f"{name}.{child}" if name else child: LayerReport(
        out_features=W.shape[0], in_features=W.shape[1], rank=rank, full_rank=width, replaced=True,
        parameters_before=W.numel(), parameters_after=after, truncation_loss=loss,
        relative_loss=loss / total if total > 0 else 0.0) for child, (W, after) in children.items()}


def compress_modegpt(model: nn.Module, *, ratio: float | None, rank: int | None, energy: float | None,
                     calibration: Iterable[Any] | None, allocation: str | None, start: float,
                     modules: tuple[str, ...] = PAIRS, damping: float = 1e-2, progress: bool = False,
                     **options: Any) -> CompressionReport:
    """``method="modegpt"`` for :func:`~spectrakit.compress.compress` (the module docstring).

    Args:
        model: a model with Llama- or GPT-2-style blocks.
        ratio: the fraction of each pair's weights to remove.
        rank: keep ``min(rank, width)`` dimensions of every pair (neurons, head dimensions).
        energy, allocation: ``energy`` and non-uniform allocations are refused.
        calibration: batches the model is run on.
        start: ``time.perf_counter()`` when the call began.
        modules: the pairs to compress, any of ``"mlp"``, ``"qk"``, ``"vo"`` (default all three).
        damping: the MLP leverage scores' ridge, relative to ``mean diag C``.
        progress: a progress bar over the calibration batches.
        options: anything else, refused.
    """
    if options:
        raise SpectrakitError(f"method 'modegpt': bad option ({', '.join(options)})")
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    if not modules or any(m not in PAIRS for m in modules):
        raise SpectrakitError(f"modegpt: modules={modules!r}: choose among {', '.join(map(repr, PAIRS))}")
    if energy is not None or allocation not in (None, "uniform"):
        raise SpectrakitError("method 'modegpt' takes ratio= or rank= with allocation='uniform'")
    if (ratio is None) == (rank is None):
        raise SpectrakitError("compress: give exactly one of ratio= or rank= for method 'modegpt'")
    if ratio is not None and not 0 < ratio < 1:
        raise SpectrakitError(f"ratio={ratio!r} must be in (0, 1): the fraction of the targeted weights to remove")
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise SpectrakitError(f"modegpt: rank={rank!r} must be an integer >= 1")
    if not damping > 0:
        raise SpectrakitError(f"modegpt: damping={damping!r} must be > 0")
    blocks = find_mlps(model) if "mlp" in modules else {}
    attention = find_attention(model) if {"qk", "vo"} & set(modules) else {}
    if "mlp" in modules and not blocks:
        raise SpectrakitError(f"modegpt: {type(model).__name__} has no MLP block of a known layout; "
                              f"supported: {SUPPORTED}")
    if {"qk", "vo"} & set(modules) and not attention:
        raise SpectrakitError(f"modegpt: {type(model).__name__} has no attention layer of a known layout; "
                              f"supported: {ATTENTION_SUPPORTED}; or pass modules=('mlp',)")
    if calibration is None:
        raise SpectrakitError("method 'modegpt' needs calibration=batches (inputs the model is run on)")
    hooked = {f"{name}.{LAYOUTS[layout][-1]}": getattr(block, LAYOUTS[layout][-1])
              for name, (layout, block) in blocks.items()}
    hooked.update({f"{name}#input": dense.reads for name, dense in attention.items()})
    squares = OutputSquares({f"{name}.{side}": part for name, dense in attention.items()
                             for side, part in dense.outputs.items()} if "qk" in modules else {})
    parameters_before = count_parameters(model)
    calibration_start = time.perf_counter()
    try:
        statistics = collect_statistics(model, hooked, calibration, gram=True, head=_output_head(model),
                                        progress=progress)
    finally:
        squares.remove()
    calibration_seconds = time.perf_counter() - calibration_start
    sites = module_sites(model)
    layers: dict[str, LayerReport] = {}
    for name, (layout, block) in blocks.items():
        children = LAYOUTS[layout]
        down_name = f"{name}.{children[-1]}"
        width = out_in(getattr(block, children[-1])).shape[1]
        keep = _keep(width, ratio, rank)
        gram = statistics[down_name].gram
        assert gram is not None
        if not float(gram.diagonal().sum()) > 0:
            raise SpectrakitError(f"modegpt: the MLP neurons of {name} never fire on the calibration data")
        selected, mapping = nystrom_selection(gram, keep, damping)
        for child in children:
            layer = getattr(block, child)
            W = out_in(layer)
            bias = getattr(layer, "bias", None)
            bias = bias.detach() if isinstance(bias, torch.Tensor) else None
            if child == children[-1]:  # the down-projection: W_d M
                new_weight, new_bias = (W.double() @ mapping.to(W.device)).to(W.dtype), bias
            else:  # the up side keeps its rows S (and their biases)
                new_weight = W[selected.to(W.device)]
                new_bias = None if bias is None else bias[selected.to(bias.device)]
            replace_module(model, sites[id(layer)], _narrowed(layer, new_weight, new_bias))
            layers.update(_pair_reports(name, {child: (W, new_weight.numel())}, keep, width))
    config = getattr(model, "config", None)
    for name, dense in attention.items():
        d = dense.head_dim
        qk_index = None
        if "qk" in modules:
            keep_qk = _keep(d, ratio, rank, step=2 if dense.rotary else 1)
            qk_index = query_key_selection(dense, squares.sums[f"{name}.q"], squares.sums[f"{name}.k"], keep_qk)
        vo = None
        if "vo" in modules:
            gram = statistics[f"{name}#input"].gram
            assert gram is not None
            if not float(gram.diagonal().sum()) > 0:
                raise SpectrakitError(f"modegpt: the attention input of {name} is all zero on the calibration data")
            keep_vo = _keep(d, ratio, rank)
            values, outputs, spectra = value_output_factors(dense, gram, keep_vo)
            vo = (values.to(dense.v.dtype), outputs.to(dense.o.dtype))
            dropped, total = float(spectra[:, keep_vo:].sum()), float(spectra.sum())
        new = narrow(dense, qk_index, vo, config)
        replace_module(model, sites[id(dense.module)], new)
        if "qk" in modules:
            layers.update(_pair_reports(name, {"q_proj": (dense.q, new.q_proj.weight.numel()),
                                               "k_proj": (dense.k, new.k_proj.weight.numel())}, new.qk_dim, d))
        if "vo" in modules:
            layers.update(_pair_reports(name, {"v_proj": (dense.v, new.v_proj.weight.numel()),
                                               "o_proj": (dense.o, new.o_proj.weight.numel())}, new.vo_dim, d,
                                        dropped, total))
    target_before = sum(layer.parameters_before for layer in layers.values())
    target_after = sum(layer.parameters_after for layer in layers.values())
    removed = 1 - target_after / max(target_before, 1)
    if ratio is not None and removed < ratio - 0.005:  # every pair keeps at least one dimension (a rotary pair)
        warnings.warn(f"modegpt: ratio={ratio} is out of reach: every pair keeps at least one dimension (two for "
                      f"rotary query/key), so only {removed:.1%} of the targeted weights were removed",
                      CompressionWarning, stacklevel=3)
    budget = {"ratio": ratio, "rank": rank, "damping": damping, "modules": list(modules)}
    return CompressionReport(
        method="modegpt", allocation="uniform", budget={k: v for k, v in budget.items() if v is not None},
        parameters_before=parameters_before, parameters_after=count_parameters(model),
        target_parameters_before=target_before, target_parameters_after=target_after, layers=layers,
        calibration_tokens=max((s.tokens for s in statistics.values()), default=0),
        seconds=time.perf_counter() - start, calibration_seconds=calibration_seconds)
