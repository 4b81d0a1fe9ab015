"""Compress a checkpoint larger than memory, one decoder block at a time.

``compress(folder, method, ratio=…, calibration=…, out=DIR, low_memory=True)`` (and
``spectrakit compress FOLDER --low-memory --out DIR``) reads a Hugging Face checkpoint
(``config.json`` and safetensors shards with their index) and writes the compressed model
shard by shard, holding one block's weights and the calibration activations at a time:

1. the model is built from ``config.json`` with its parameters on the meta device
   (:class:`~spectrakit.weights.checkpoint.Checkpoint`); the tensors outside the blocks
   but the output head (embeddings, final norm) are loaded, the calibration batches are run
   up to the first block and its inputs kept (:func:`~spectrakit.compress.blockwise.capture_inputs`),
   and those tensors are written as the first shard and let go;
2. for each block: its tensors are read from the shards, its layers' statistics gathered on
   its inputs, its layers decomposed and truncated, the inputs run through the *compressed*
   block (the next block's inputs), its tensors written as one shard, and the block let go;
3. the output head is copied (a head tied to the embeddings is stored once), then
   ``config.json``, ``compress.json`` (what :func:`~spectrakit.compress.load_compressed`
   reads), ``model.safetensors.index.json`` and the folder's tokenizer files; the folder
   appears under ``out`` only once complete (:class:`~spectrakit._shards.ShardedOutput`).

Under ``torchrun`` (``WORLD_SIZE > 1``) the work of each block is shared among the ranks, as
the in-memory ``compress`` shares it (:mod:`spectrakit.compress.distributed`): every rank
reads the block, rank ``r`` runs its share ``r, r + R, …`` of the calibration batches through
it (the statistics are summed onto each layer's owner), the block's layers are dealt by
``out · in · min(out, in)`` and each owner decomposes and truncates its own, then sends the
factors to every rank bit for bit; rank 0 alone writes the output. A failure on any rank stops
every rank with one line before the folder appears.

The result equals ``compress(model, method, …, sequential=True)`` on the model in memory
(:mod:`spectrakit.compress.blockwise`), and for ``svd`` the ordinary in-memory result.
Supported: methods ``svd``, ``asvd``, ``svd-llm``, ``svd-llm-v2``; budgets ``ratio=``,
``rank=``, ``energy=`` with ``allocation="uniform"`` (a global allocation needs every
layer's spectrum before the first block is written).

>>> import tempfile, torch, transformers, spectrakit as sk
>>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
>>> folder = tempfile.mkdtemp()
>>> transformers.GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="40KB")
>>> report = sk.compress(folder, "svd", rank=4, out=folder + "/small", low_memory=True)
>>> model = sk.load_compressed(folder + "/small")
>>> type(model.transformer.h[0].mlp.c_fc).__name__
'LowRankLinear'
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterable, Sized
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from .._distributed import _comm_device, agree, distributed_group, exchange
from .._memory import release_freed_memory
from .._progress import progress as progress_bar
from .._shards import DiscardedOutput, ShardedOutput
from .._targets import layer_weight
from ..cache import use_cache
from ..errors import SpectrakitError
from ..weights.checkpoint import Checkpoint, decoder_blocks
from .base import CompressionWarning
from .blockwise import (
    BlockInputs,
    block_statistics,
    capture_inputs,
    check_blockwise,
    compress_block,
    layers_by_block,
    make_report,
    run_block,
)

#: files of a model folder that are weights (not copied: the output has its own)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")
_COPY_LIMIT = 64 * 2**20  # tokenizer and generation files are small; anything larger is not copied


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name → every name it has (tied parameters have several)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {names[0]: names for names in groups.values()}


def _head_names(model: nn.Module, aliases: dict[str, list[str]]) -> set[str]:
    """First names of the output head's parameters that no module before the blocks shares."""
    from .api import _output_head

    head = _output_head(model)
    if head is None:
        return set()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {first for first, names in aliases.items()
            if all(name.startswith(prefix + ".") for name in names)}


def _release_parameters(model: nn.Module, names: Iterable[str], aliases: dict[str, list[str]]) -> None:
    for first in names:
        for name in aliases[first]:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            param = module._parameters[leaf]
            if param is not None and not param.is_meta:
                module._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)


def _write_shard(output: Any, tensors: dict[str, Any]) -> None:
    output.add(tensors)
    output.flush()


def _capture_share(model: nn.Module, block: nn.Module, calibration: Iterable[Any], group: tuple[int, int] | None,
                   progress: bool) -> tuple[BlockInputs, int]:
    """The first block's inputs of this rank's batches (all of them in one process) and the
    number of real tokens over every rank."""
    if group is None:
        inputs = capture_inputs(model, block, calibration, progress=progress)
        return inputs, inputs.tokens
    import torch
    import torch.distributed as dist

    from .calibration import _check_finite
    from .distributed import calibration_share

    rank, world = group

    def work() -> BlockInputs:
        batches, numbers = calibration_share(calibration, rank, world)
        for batch, number in zip(batches, numbers):
            _check_finite(batch, number)  # named by its number in the whole set, not in this rank's share
        if not batches:
            total = len(calibration) if isinstance(calibration, Sized) else None
            if total == 0 or (total is None and rank == 0):
                raise SpectrakitError("calibration yielded no batches")
            return BlockInputs()
        return capture_inputs(model, block, batches, progress=progress and rank == 0)

    inputs = agree(work, "calibration")
    tokens = torch.tensor([inputs.tokens], dtype=torch.int64, device=_comm_device())  # nccl takes no CPU tensor
    dist.all_reduce(tokens)
    return inputs, int(tokens.item())


def _compress_block_shared(model: nn.Module, block: nn.Module, layers: dict[str, nn.Module],
                           matrices: dict[str, Any], inputs: BlockInputs, solver: Any, group: tuple[int, int], *,
                           method: str, svd_method: str, **budget: Any) -> tuple[dict[str, Any], float]:
    """One block's layers compressed weight-parallel: statistics summed onto each layer's owner,
    each owner decomposes and truncates its layers, the factors and reports go to every rank
    (which swaps in the same :class:`LowRankLinear`); returns the reports and the seconds spent
    on statistics."""
    import torch.distributed as dist

    from .._targets import module_sites, replace_module
    from .distributed import _merge_method_state, layer_owners, reduce_statistics
    from .lowrank import LowRankLinear

    rank, world = group
    owner_of = layer_owners(matrices, world)
    names = list(layers)
    stats_start = time.perf_counter()
    local = agree(lambda: block_statistics(block, layers, matrices, inputs, solver, svd_method)
                  if inputs.hidden else {}, "calibration")
    statistics = reduce_statistics(local, names, owner_of=owner_of) if solver.needs else {}
    del local
    stats_seconds = time.perf_counter() - stats_start
    mine = {name: layer for name, layer in layers.items() if owner_of[name] == rank}
    counters = {key: value for key, value in vars(solver).items() if isinstance(value, int)}
    reports = agree(lambda: compress_block(model, mine, {name: matrices[name] for name in mine}, statistics, solver,
                                           method=method, svd_method=svd_method, release=Checkpoint.release,
                                           **budget), f"compress {method}")
    matrices.clear()
    statistics.clear()
    _merge_method_state(solver, counters, names)
    sent: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        if report.replaced:
            new = model.get_submodule(name)
            sent[name] = {"up": new.get_parameter("up"), "down": new.get_parameter("down")}
    received = exchange(sent, {name: owner_of[name] for name in sent})
    every: list[Any] = [None] * world
    dist.all_gather_object(every, reports)
    sites = module_sites(model)
    for part in every:
        for name, report in part.items():
            reports[name] = report
            if owner_of[name] == rank or not report.replaced:
                continue
            layer = layers[name]
            weight = layer_weight(layer)
            bias = getattr(layer, "bias", None)
            new = LowRankLinear.from_factors(received[name]["up"], received[name]["down"],
                                             bias.detach() if bias is not None else None, method=method,
                                             dtype=weight.dtype)
            replace_module(model, sites[id(layer)], new.to(weight.device))
            del weight, bias, new
            Checkpoint.release(layer)
    del received, sent
    return {name: reports[name] for name in names}, stats_seconds


def compress_checkpoint(source: str | os.PathLike[str], method: str, solver: Any, *, out: str | os.PathLike[str],
                        ratio: float | None, rank: int | None, energy: float | None,
                        calibration: Iterable[Any] | None, allocation: str | None, targets: str | Iterable[str],
                        svd_method: str, only_if_smaller: bool, progress: bool, options: dict[str, Any],
                        distributed: bool | None = None) -> Any:
    """Compress the checkpoint folder ``source`` block by block into the folder ``out``.

    Called by :func:`~spectrakit.compress.compress` for a folder and ``low_memory=True``
    (the module docstring says what is held and written when); returns the
    :class:`~spectrakit.compress.CompressionReport`, also saved in ``out/compress.json``.

    Args:
        source: the Hugging Face checkpoint folder.
        method: the method's name.
        solver: the method, built with ``options``.
        out: the output folder (replaced as a whole if it holds an earlier output).
        ratio, rank, energy: the budget (exactly one).
        calibration: the batches (token ids or dicts of model arguments); not needed by ``svd``.
        allocation: ``None`` or ``"uniform"``.
        targets: ``"all-linear"`` or patterns of layers inside the decoder blocks.
        svd_method: as in :func:`~spectrakit.compress.compress`.
        only_if_smaller: as in :func:`~spectrakit.compress.compress`.
        progress: progress bars over the batches and the blocks.
        options: the method options, recorded in the report's budget.
        distributed: share each block's work among the ``torchrun`` ranks (``None``: when
            ``WORLD_SIZE > 1``; see :func:`spectrakit._distributed.distributed_group`).
    """
    from . import persist
    from .allocation import check_budget
    from .api import _canonical_weight, count_parameters, find_layers

    start = time.perf_counter()
    check_blockwise(method, solver, allocation, "low_memory=True")
    check_budget(ratio, rank, energy, "uniform")
    if solver.needs and calibration is None:
        raise SpectrakitError(f"method {method!r} needs calibration=batches (inputs the model is run on)")
    group = distributed_group(distributed)
    this_rank = 0 if group is None else group[0]
    checkpoint = Checkpoint(source)
    model = checkpoint.skeleton()
    layers = find_layers(model, targets)
    prefix, blocks = decoder_blocks(model)
    grouped = layers_by_block(layers, prefix, len(blocks), "low_memory=True")
    names = list(layers)
    del layers  # the modules are reached through `grouped`, so each block's can be let go
    parameters_before = count_parameters(model)
    aliases = _aliases(model)
    in_blocks = {first for first in aliases if first.startswith(prefix + ".")}
    head = _head_names(model, aliases) - in_blocks
    before_blocks = [first for first in aliases if first not in in_blocks and first not in head]

    reports: dict[str, Any] = {}
    calibration_seconds = 0.0
    # rank 0 writes; every rank learns at once if the folder cannot be written
    opened: Any = agree(lambda: ShardedOutput(out, marker=persist.CONFIG) if this_rank == 0 else DiscardedOutput(),
                         "out")
    with opened as output:
        # 1. embeddings and the rest outside the blocks (but the head): the first block's inputs, then shard 1
        checkpoint.materialize(model, before_blocks)
        checkpoint.load_buffers(model, "")
        inputs, tokens = BlockInputs(), 0
        if solver.needs:
            capture_start = time.perf_counter()
            assert calibration is not None
            inputs, tokens = _capture_share(model, blocks[0], calibration, group, progress)
            calibration_seconds += time.perf_counter() - capture_start
        state, parameter_names = model.state_dict(), {name for names in aliases.values() for name in names}
        first = {name: state[name] for name in before_blocks}
        first.update({name: buffer for name, buffer in state.items()  # persistent buffers outside the blocks
                      if name not in parameter_names and not name.startswith(prefix + ".")})
        agree(partial(_write_shard, output, first), "write")
        del state, first
        _release_parameters(model, before_blocks, aliases)

        # 2. one block at a time
        for index in progress_bar(range(len(blocks)), total=len(blocks), desc=f"compress {method}",
                                  enabled=progress and this_rank == 0, unit="block"):
            block, block_layers, name = blocks[index], grouped[index], f"{prefix}.{index}"
            checkpoint.materialize(model, [f"{name}.{leaf}" for leaf, _ in block.named_parameters()])
            checkpoint.load_buffers(block, name)
            matrices = {layer: _canonical_weight(layer, module) for layer, module in block_layers.items()}
            budget_of: dict[str, Any] = {"ratio": ratio, "rank": rank, "energy": energy,
                                         "only_if_smaller": only_if_smaller}
            if group is None:
                stats_start = time.perf_counter()
                statistics = block_statistics(block, block_layers, matrices, inputs, solver, svd_method)
                calibration_seconds += time.perf_counter() - stats_start
                release_freed_memory()
                reports.update(compress_block(model, block_layers, matrices, statistics, solver, method=method,
                                              svd_method=svd_method, release=Checkpoint.release, **budget_of))
                del statistics
            else:
                shared, seconds = _compress_block_shared(model, block, block_layers, matrices, inputs, solver, group,
                                                         method=method, svd_method=svd_method, **budget_of)
                reports.update(shared)
                calibration_seconds += seconds
            del matrices, block_layers
            grouped[index] = {}  # the dense layers are not kept
            block = blocks[index]  # its layers were replaced in place
            if solver.needs and index < len(blocks) - 1:  # a collective: every rank, batches of its own or not
                agree(partial(run_block, block, inputs) if inputs.hidden else lambda: None, "calibration")
            agree(partial(_write_shard, output, block.state_dict(prefix=f"{name}.")), "write")
            Checkpoint.release(block)
            release_freed_memory()  # glibc would otherwise keep the freed block in a fragmented heap

        # 3. the output head, read and written alone
        def write_head() -> None:
            for first in sorted(head):
                output.add({first: checkpoint.load(next(n for n in aliases[first] if checkpoint.has(n)))})
                output.flush()

        agree(write_head if this_rank == 0 else lambda: None, "write")
        for message in solver.warnings():
            warnings.warn(message, CompressionWarning, stacklevel=4)  # the caller of compress()
        budget = {"ratio": ratio, "rank": rank, "energy": energy, "low_memory": True, **options}
        report = make_report(method, budget, parameters_before, {layer: reports[layer] for layer in names},
                             tokens, start, calibration_seconds)

        def finish() -> None:
            config: Any = getattr(model, "config", None)
            output.write_text(persist.HF_CONFIG, config.to_json_string(use_diff=False))
            for file in sorted(checkpoint.folder.iterdir()):
                if (file.is_file() and file.name != persist.HF_CONFIG and not file.name.endswith(_WEIGHT_SUFFIXES)
                        and not file.name.startswith(".") and file.stat().st_size <= _COPY_LIMIT):
                    output.copy(file)
            buffers = {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
                       if b.is_floating_point()}
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            output.write_json(persist.CONFIG, {
                "format": persist.FORMAT, "version": persist.VERSION,
                "architecture": persist._hf_class(model) or "module", "layers": persist._layers(model),
                "dtype": str(dtype).removeprefix("torch."), "buffer_dtypes": buffers, "report": report.to_dict(),
                "source": str(Path(source))})

        agree(finish, "write")
        output.commit()  # the folder appears only once every rank got here
    return report


def dispatch(model: Any, method: str, *, sequential: bool, low_memory: bool, out: str | os.PathLike[str] | None,
             lora_update: bool, svd_method: str, options: dict[str, Any], cache: Any = None,
             distributed: bool | None = None, **arguments: Any) -> Any:
    """``compress`` for a checkpoint folder (``low_memory=True``) or with ``sequential=True``:
    the options checked in one line each, then :func:`compress_checkpoint` or
    :func:`~spectrakit.compress.blockwise.compress_sequential`.

    Args:
        model: a checkpoint folder, or a model in memory (``sequential=True``).
        method: the method's name.
        sequential: calibrate each block on the compressed blocks before it.
        low_memory: compress the folder ``model`` block by block into ``out``.
        out: the output folder (``low_memory=True``).
        lora_update: refused here (it fine-tunes the whole model).
        svd_method: as in :func:`~spectrakit.compress.compress`.
        options: the method options.
        cache: a :class:`~spectrakit.SpectrumCache` (or its folder) for the SVDs (``None``: the
            one in use, if any).
        distributed: ``low_memory=True`` under ``torchrun``: share each block's work among the
            ranks (``None``: when ``WORLD_SIZE > 1``; ``False``: one process).
        arguments: the rest of :func:`~spectrakit.compress.compress`'s arguments.
    """
    from ..linalg.svd import METHODS as SVD_METHODS
    from .api import get_method
    from .blockwise import BLOCKWISE_METHODS, compress_sequential

    is_folder = isinstance(model, (str, os.PathLike))
    what = "low_memory=True" if low_memory or is_folder else "sequential=True"
    if is_folder and not low_memory:
        raise SpectrakitError(f"compress({str(model)!r}): a checkpoint folder is compressed block by block; pass "
                              "low_memory=True and out=DIR (or load the model and pass it)")
    if low_memory and not is_folder:
        raise SpectrakitError("low_memory=True takes a checkpoint folder; a model in memory is compressed in "
                              "place (sequential=True gives the same result)")
    if out is not None and not low_memory:
        raise SpectrakitError("out= is where low_memory=True writes; save an in-memory result with "
                              "save_compressed(model, DIR, report)")
    if low_memory and out is None:
        raise SpectrakitError("low_memory=True writes the compressed checkpoint shard by shard: pass out=DIR")
    if method not in BLOCKWISE_METHODS:
        raise SpectrakitError(f"{what} supports method {', '.join(BLOCKWISE_METHODS)}, not {method!r} "
                              "(fwsvd and gfwsvd need the loss gradient through every later block)")
    if lora_update:
        raise SpectrakitError(f"{what}: lora_update=True fine-tunes the whole model; run it in memory afterwards")
    if svd_method not in SVD_METHODS:
        raise SpectrakitError(f"svd_method={svd_method!r} is not one of {', '.join(SVD_METHODS)}")
    solver = get_method(method, options)
    keep = ("ratio", "rank", "energy", "calibration", "allocation", "targets", "only_if_smaller", "progress")
    chosen = {key: arguments[key] for key in keep}
    with contextlib.nullcontext() if cache is None else use_cache(cache):  # the methods' SVDs read it
        if low_memory:
            assert out is not None
            return compress_checkpoint(model, method, solver, out=out, svd_method=svd_method, options=options,
                                       distributed=distributed, **chosen)
        return compress_sequential(model, method, solver, svd_method=svd_method, options=options, **chosen)


def run_command(args: Any) -> int:
    """``spectrakit compress SOURCE --low-memory --out DIR``: the folder compressed block by
    block (:func:`compress_checkpoint`), calibrated on the same text as the in-memory command;
    ``report.json`` is written beside the shards.

    Args:
        args: the parsed ``compress`` command line.
    """
    import json
    import sys

    from .._atomic import atomic_write
    from .api import compress
    from .command import calibration_batches, calibration_text

    if args.source is None:
        raise SpectrakitError("--low-memory needs SOURCE, a Hugging Face checkpoint folder (the bundled reference "
                              "model fits in memory)")
    folder = Path(args.source)
    checkpoint_config = Checkpoint(folder).config_dict  # checks the folder before the text is read
    budget = {"ratio": args.ratio, "rank": args.rank, "energy": args.energy}
    if all(value is None for value in budget.values()):
        budget["ratio"] = 0.3
    options = {name: getattr(args, name) for name in ("alpha", "damping") if getattr(args, name, None) is not None}
    calibration = None
    if args.method != "svd":
        tokenizer = _tokenizer(folder, checkpoint_config)
        calibration = calibration_batches(calibration_text(args), tokenizer,
                                          args.calib, args.seq_len, args.batch_size, args.seed)
    from .._distributed import torchrun_group

    with torchrun_group() as rank, warnings.catch_warnings(record=True) as caught:  # under torchrun: rank 0 writes
        warnings.simplefilter("always", CompressionWarning)
        report = compress(str(folder), args.method, calibration=calibration, allocation=args.allocation,
                          targets=args.targets or "all-linear", progress=not args.quiet and rank == 0, out=args.out,
                          low_memory=True, **budget, **options)
    if rank != 0:
        return 0
    for warning in caught:
        print(f"spectrakit: warning: {warning.message}", file=sys.stderr)
    out = Path(args.out)
    with atomic_write(out / "report.json") as handle:
        json.dump({"source": str(folder), "calibration_sequences": args.calib, "seq_len": args.seq_len,
                   **report.to_dict()}, handle, indent=2)
    if not args.quiet:
        print(report)
        print(f"wrote {out} (shards, model.safetensors.index.json, compress.json, report.json)")
    return 0


def _tokenizer(folder: Path, config: dict[str, Any]) -> Any:
    """The folder's tokenizer; ``None`` for a byte-level model without one (calibrated on raw bytes)."""
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # no tokenizer files: only a byte-level model can be calibrated
        if config.get("vocab_size") != 256:
            raise SpectrakitError(f"{folder}: no tokenizer to encode calibration text and the vocabulary is not "
                                  "byte-level; add tokenizer files or use --method svd") from None
        return None
