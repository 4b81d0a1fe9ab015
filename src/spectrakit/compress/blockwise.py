"""Compression one decoder block at a time, each block calibrated on the *compressed* blocks before it.

This is the sequential definition of SVD-LLM's and GPTQ's layer-wise update: block ``i``'s
calibration statistics (``XᵀX`` of each linear layer's inputs, …) are gathered on the
outputs of blocks ``0 … i−1`` after they were compressed, not on the dense model's,

.. math::  h_0 = \\mathrm{embed}(x), \\qquad h_{i+1} = \\hat B_i(h_i), \\qquad
           \\hat B_i = \\mathrm{compress}\\big(B_i;\\ \\text{statistics of } h_i\\big),

so each block's truncation corrects for the error the earlier truncations put into its
inputs. Steps:

1. :func:`capture_inputs` runs the calibration batches through the model up to its first
   block (a forward pre-hook ends each forward there) and keeps what the model passes
   the block: the hidden states and every other argument (attention mask, position
   embeddings, …), which is what makes it work for any architecture;
2. for each block: :func:`block_statistics` gathers its layers' statistics on those inputs
   (:func:`~spectrakit.compress.calibration.collect_statistics`), :func:`compress_block`
   decomposes, truncates and replaces its layers one at a time (:func:`decompose` is the
   per-layer SVD), and :func:`run_block` replaces the inputs by the compressed
   block's outputs, the next block's inputs.

``compress(model, sequential=True)`` runs this on a model in memory
(:func:`compress_sequential`); :mod:`spectrakit.compress.low_memory` runs the same steps
on a checkpoint folder, loading one block at a time, so both give the same weights.
Ranks are allocated per layer (``allocation="uniform"``): a global allocation would need
every layer's spectrum before the first block is truncated.

>>> import torch, transformers, spectrakit as sk
>>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
>>> model = transformers.GPT2LMHeadModel(config)
>>> batches = [torch.randint(0, 64, (8, 16)) for _ in range(4)]
>>> report = sk.compress(model, "svd-llm", ratio=0.3, calibration=batches, sequential=True)
>>> report.layers["transformer.h.1.mlp.c_fc"].rank    # ⌊0.7 · 32·128 / (32 + 128)⌋
17
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._memory import release_freed_memory
from .._progress import progress as progress_bar
from .._targets import layer_weight, module_sites, replace_module
from ..errors import SpectrakitError
from ..weights.checkpoint import decoder_blocks
from .allocation import LayerShape, allocate, check_budget
from .base import CompressionWarning, Method, Spectrum
from .calibration import (
    LayerStatistics,
    _check_finite,
    _model_errors_named,
    _padding_mask,
    collect_statistics,
    run_model,
)
from .lowrank import LowRankLinear, low_rank_parameters

#: methods whose statistics a block's own inputs give (fwsvd and gfwsvd need the gradient of
#: the loss at the model's output, through every later block)
BLOCKWISE_METHODS = ("svd", "asvd", "svd-llm", "svd-llm-v2")


@dataclass
class BlockInputs:
    """What the model passes its first block for each calibration batch (then, after
    :func:`run_block`, what the next block receives): hidden states, the other positional
    and keyword arguments, and which tokens are real (``None``: all)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(int(h.shape[:-1].numel()) if m is None else int(m.sum()) for h, m in zip(self.hidden, self.masks))


class _Captured(BaseException):
    """Ends a forward at the first block (a BaseException: a model's ``except Exception`` cannot swallow it)."""


def check_blockwise(method: str, solver: Method, allocation: str | None, what: str) -> None:
    """Refuse, in one line, what block-by-block compression cannot do.

    Args:
        method: the method's name.
        solver: the method.
        allocation: the allocation asked for (``None`` or ``"uniform"`` are accepted).
        what: the option that asked for it, for the message (``"low_memory=True"``).
    """
    if method not in BLOCKWISE_METHODS:
        raise SpectrakitError(f"{what} supports method {', '.join(BLOCKWISE_METHODS)}, not {method!r} "
                              "(fwsvd and gfwsvd need the loss gradient through every later block)")
    if allocation not in (None, "uniform"):
        raise SpectrakitError(f"{what} allocates ranks uniformly (each layer from its own spectrum); "
                              f"allocation={allocation!r} needs every layer's spectrum at once: compress in memory")


def layers_by_block(layers: Mapping[str, nn.Module], prefix: str, count: int, what: str
                    ) -> list[dict[str, nn.Module]]:
    """``layers`` (full module names) split by the block they are in; one outside every
    block is refused (``what`` names the option in the message)."""
    grouped: list[dict[str, nn.Module]] = [{} for _ in range(count)]
    for name, layer in layers.items():
        head, _, rest = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
        if not head.isdigit() or not rest:
            raise SpectrakitError(f"{what} compresses the layers of the decoder blocks ({prefix}.N); target {name} "
                                  "is outside them")
        grouped[int(head)][name] = layer
    return grouped


def capture_inputs(model: nn.Module, block: nn.Module, calibration: Iterable[Any], progress: bool = False
                   ) -> BlockInputs:
    """Run each calibration batch through ``model`` up to ``block`` and keep its inputs.

    Nothing after the embeddings runs, so the blocks may still be on the meta device.
    ``use_cache`` is switched off for the pass (a cache would grow with every batch).

    Args:
        model: the whole model (its embeddings loaded).
        block: its first block.
        calibration: batches as :func:`~spectrakit.compress.calibration.run_model` takes them.
        progress: a progress bar over the batches.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise SpectrakitError(f"calibration must be an iterable of batches (a list, a DataLoader, …), "
                              f"got {type(calibration).__name__}")
    inputs = BlockInputs()

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states", None)
        if not isinstance(hidden, torch.Tensor):
            raise SpectrakitError(f"{type(module).__name__}: its first argument is not the hidden states")
        inputs.hidden.append(hidden.detach())
        inputs.args.append(tuple(args[1:]))
        inputs.kwargs.append(kwargs)
        raise _Captured

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        if config is not None and use_cache is not None:
            config.use_cache = False
        for index, batch in enumerate(progress_bar(calibration, desc="first block's inputs", enabled=progress,
                                                   unit="batch")):
            _check_finite(batch, index)
            try:
                with torch.no_grad(), _model_errors_named(index, fisher=False):
                    run_model(model, batch)
            except _Captured:
                inputs.masks.append(_padding_mask(model, batch))
                continue
            raise SpectrakitError(f"calibration batch {index} never reached the first decoder block")
    finally:
        handle.remove()
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)
    if not inputs.hidden:
        raise SpectrakitError("calibration yielded no batches")
    return inputs


def run_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace each batch's hidden states by ``block``'s output on them (in place, one
    batch at a time, so the activations are held once).

    Args:
        block: a (compressed) block.
        inputs: its inputs; they become the next block's.
    """
    was_training = block.training
    block.eval()  # as the statistics were gathered: no dropout
    try:
        with torch.no_grad():
            for index, hidden in enumerate(inputs.hidden):
                with _model_errors_named(index, fisher=False):
                    output = block(hidden, *inputs.args[index], **inputs.kwargs[index])
                inputs.hidden[index] = output[0] if isinstance(output, (tuple, list)) else output
    finally:
        block.train(was_training)


class _BlockRunner(nn.Module):
    """One block called on the captured inputs of a batch, in the form
    :func:`collect_statistics` feeds a model: keywords, with the real-token mask as
    ``attention_mask`` so that padding is left out of the statistics as in a whole-model pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, block_input: tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]],
                attention_mask: torch.Tensor | None = None) -> Any:
        hidden, args, kwargs = block_input
        return self.block(hidden, *args, **kwargs)


def block_statistics(block: nn.Module, layers: dict[str, nn.Module], matrices: Mapping[str, torch.Tensor],
                     inputs: BlockInputs, solver: Method, svd_method: str = "auto"
                     ) -> dict[str, LayerStatistics]:
    """The statistics ``solver`` needs for ``layers`` (modules inside ``block``), gathered
    on ``inputs`` (none for a method without calibration).

    Args:
        block: the block.
        layers: its targeted layers by full name.
        matrices: their ``out × in`` weights (svd-llm chooses its statistic by shape).
        inputs: the block's inputs.
        solver: the compression method.
        svd_method: as in :func:`~spectrakit.compress.compress`.
    """
    if not solver.needs or not layers:
        return {}
    output_gram = {name: W for name, W in matrices.items() if solver.uses_output_gram(W, svd_method)}
    batches = [{"block_input": (hidden, inputs.args[i], inputs.kwargs[i]),
                **({"attention_mask": inputs.masks[i]} if inputs.masks[i] is not None else {})}
               for i, hidden in enumerate(inputs.hidden)]
    return collect_statistics(_BlockRunner(block), layers, batches, gram="gram" in solver.needs,
                              scale="scale" in solver.needs, output_gram=output_gram)


def decompose(solver: Method, name: str, W: torch.Tensor, stats: LayerStatistics | None,
              svd_method: str = "auto") -> Spectrum:
    """The per-layer step: one layer's transformed weight and its SVD. The one place a
    block's layers are decomposed, so a weight-parallel run can share them out (its results
    then go to :func:`compress_block` as ``spectra``).

    Args:
        solver: the compression method.
        name: the layer's name.
        W: its ``out × in`` weight.
        stats: its calibration statistics (``None`` for a method without them).
        svd_method: as in :func:`~spectrakit.compress.compress`.
    """
    spectrum = solver.spectrum(name, W, stats, svd_method=svd_method)
    release_freed_memory()  # the float64 work copies would otherwise stay in a fragmented heap
    return spectrum


def compress_block(model: nn.Module, layers: dict[str, nn.Module], matrices: dict[str, torch.Tensor],
                   statistics: dict[str, LayerStatistics], solver: Method, *, method: str, ratio: float | None,
                   rank: int | None, energy: float | None, svd_method: str = "auto", only_if_smaller: bool = True,
                   spectra: dict[str, Spectrum] | None = None,
                   release: Callable[[nn.Module], None] | None = None) -> dict[str, Any]:
    """Decompose and truncate ``layers`` one at a time and swap in their :class:`LowRankLinear`.

    The allocation is uniform, so a layer's rank needs only its own spectrum: each layer is
    decomposed, truncated and replaced before the next one is decomposed, and a block's
    spectra are never held together. Returns one :class:`~spectrakit.compress.api.LayerReport`
    per layer, by name.

    Args:
        model: the model the layers are in (they are replaced under every name they have).
        layers: the layers by full name.
        matrices: their ``out × in`` weights (consumed: each is let go once its layer is done).
        statistics: their calibration statistics (consumed).
        solver: the compression method.
        method: the method's name, recorded on each new layer.
        ratio, rank, energy: the budget (exactly one).
        svd_method: as in :func:`~spectrakit.compress.compress`.
        only_if_smaller: keep a layer dense where its factors would not save weights.
        spectra: spectra already computed (by :func:`decompose`, e.g. on another rank); the
            other layers are decomposed here.
        release: called with each replaced dense layer right after its factors are in place
            (low_memory frees its weight there, so a block is never held twice).
    """
    from .api import LayerReport  # api dispatches to this module

    sites = module_sites(model)
    reports: dict[str, Any] = {}
    for name, layer in layers.items():
        W = matrices.pop(name)
        spectrum = (spectra or {}).pop(name, None)
        if spectrum is None:
            spectrum = decompose(solver, name, W, statistics.pop(name, None), svd_method)
        shape = LayerShape(W.shape[0], W.shape[1], spectrum.losses)
        k = allocate({name: shape}, ratio=ratio, rank=rank, energy=energy, allocation="uniform",
                     only_if_smaller=only_if_smaller)[name]
        del W
        replace = not only_if_smaller or shape.cost(k) < shape.dense
        if replace:
            weight = layer_weight(layer)
            up, down = spectrum.factors(k, dtype=weight.dtype)
            bias = getattr(layer, "bias", None)
            new = LowRankLinear.from_factors(up, down, bias.detach() if bias is not None else None, method=method,
                                             dtype=weight.dtype)
            replace_module(model, sites[id(layer)], new.to(weight.device))
            del weight, up, down, new, bias
            if release is not None:
                release(layer)
        del spectrum
        release_freed_memory()
        dropped = float(shape.losses[k:].sum()) if replace else 0.0
        reports[name] = LayerReport(
            out_features=shape.out_features, in_features=shape.in_features,
            rank=k if replace else shape.full_rank, full_rank=shape.full_rank, replaced=replace,
            parameters_before=shape.dense,
            parameters_after=low_rank_parameters(shape.in_features, shape.out_features, k) if replace else shape.dense,
            truncation_loss=dropped, relative_loss=dropped / max(float(shape.losses.sum()), 1e-300))
    return reports


def make_report(method: str, budget: dict[str, Any], parameters_before: int, layers: dict[str, Any], tokens: int,
                start: float, calibration_seconds: float) -> Any:
    """The :class:`~spectrakit.compress.api.CompressionReport` of a block-by-block run (and
    the warning :func:`~spectrakit.compress.compress` gives when ``ratio`` is out of reach)."""
    from .api import CompressionReport

    before = sum(layer.parameters_before for layer in layers.values())
    after = sum(layer.parameters_after for layer in layers.values())
    ratio = budget.get("ratio")
    if ratio is not None and 1 - after / max(before, 1) < ratio - 0.005:
        warnings.warn(f"ratio={ratio} is out of reach: every layer keeps at least rank 1, so only "
                      f"{1 - after / max(before, 1):.1%} of the targeted weights were removed", CompressionWarning,
                      stacklevel=5)  # the caller of compress()
    return CompressionReport(method=method, allocation="uniform",
                             budget={k: v for k, v in budget.items() if v is not None},
                             parameters_before=parameters_before,
                             parameters_after=parameters_before - before + after, target_parameters_before=before,
                             target_parameters_after=after, layers=layers, calibration_tokens=tokens,
                             seconds=time.perf_counter() - start, calibration_seconds=calibration_seconds)


def compress_sequential(model: nn.Module, method: str, solver: Method, *, ratio: float | None, rank: int | None,
                        energy: float | None, calibration: Iterable[Any] | None, allocation: str | None,
                        targets: str | Iterable[str], svd_method: str, only_if_smaller: bool, progress: bool,
                        options: dict[str, Any]) -> Any:
    """``compress(model, method, sequential=True, …)``: the blocks of ``model`` compressed in
    order, in place, each calibrated on the compressed blocks before it (module docstring).

    Args:
        model: a transformer with a stack of blocks (``nn.ModuleList``).
        method: the method's name.
        solver: the method, built with ``options``.
        ratio, rank, energy: the budget (exactly one).
        calibration: the batches (not needed by ``svd``).
        allocation: ``None`` or ``"uniform"``.
        targets: as in :func:`~spectrakit.compress.compress`; they must be inside the blocks.
        svd_method: as in :func:`~spectrakit.compress.compress`.
        only_if_smaller: as in :func:`~spectrakit.compress.compress`.
        progress: progress bars.
        options: the method options, recorded in the report's budget.
    """
    from .api import _canonical_weight, count_parameters, find_layers

    start = time.perf_counter()
    check_blockwise(method, solver, allocation, "sequential=True")
    check_budget(ratio, rank, energy, "uniform")
    layers = find_layers(model, targets)
    prefix, blocks = decoder_blocks(model)
    grouped = layers_by_block(layers, prefix, len(blocks), "sequential=True")
    parameters_before = count_parameters(model)
    inputs = BlockInputs()
    calibration_seconds = 0.0
    if solver.needs:
        if calibration is None:
            raise SpectrakitError(f"method {method!r} needs calibration=batches (inputs the model is run on)")
        capture_start = time.perf_counter()
        inputs = capture_inputs(model, blocks[0], calibration, progress=progress)
        calibration_seconds += time.perf_counter() - capture_start
    tokens = inputs.tokens
    reports: dict[str, Any] = {}
    last = max((i for i, group in enumerate(grouped) if group), default=-1)
    for index in progress_bar(range(last + 1), total=last + 1, desc=f"compress {method}", enabled=progress,
                              unit="block"):
        block, block_layers = blocks[index], grouped[index]
        matrices = {name: _canonical_weight(name, layer) for name, layer in block_layers.items()}
        stats_start = time.perf_counter()
        statistics = block_statistics(block, block_layers, matrices, inputs, solver, svd_method)
        calibration_seconds += time.perf_counter() - stats_start
        reports.update(compress_block(model, block_layers, matrices, statistics, solver, method=method, ratio=ratio,
                                      rank=rank, energy=energy, svd_method=svd_method,
                                      only_if_smaller=only_if_smaller))
        if solver.needs and index < last:
            run_block(block, inputs)
    for message in solver.warnings():
        warnings.warn(message, CompressionWarning, stacklevel=4)  # the caller of compress()
    budget = {"ratio": ratio, "rank": rank, "energy": energy, "sequential": True, **options}
    return make_report(method, budget, parameters_before, {name: reports[name] for name in layers}, tokens, start,
                       calibration_seconds)
