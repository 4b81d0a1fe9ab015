"""SVD-initialized adapters from a checkpoint folder, one tensor at a time.

``init_from_checkpoint(folder, "pissa", rank=16, out=DIR)`` (and ``spectrakit adapter-init
FOLDER --method pissa --rank 16 --out DIR``) does what ``adapt(model, "pissa", rank=16)``
followed by ``save_adapter`` does, without loading the model: the targeted layers are
chosen on the model skeleton (parameters on the meta device, built from ``config.json``),
and the checkpoint's tensors are then read one at a time in name order. A targeted
weight (with its bias) is put into its layer, the method's own class wraps it (the same
SVD, the same ``W_res = W − s·B A`` as in memory), the adapter's tensors are kept and the
residual weight is written; every other tensor is copied as it is. Each block's adapter
tensors go to a part file at the block's end, and ``adapter.safetensors`` is assembled from
the parts by copying bytes, so memory holds one block, not the whole adapter. ``DIR`` then holds

* the residual checkpoint: ``config.json``, safetensors shards (one per block) and
  ``model.safetensors.index.json``, with the source folder's tokenizer files, loadable with
  ``transformers``' ``from_pretrained(DIR)``;
* ``adapter.safetensors``, in :func:`~spectrakit.save_adapter`'s format:
  ``load_adapter(residual_model, DIR / "adapter.safetensors")`` gives the model that
  ``adapt`` gives in memory (the same weights, the same outputs).

For a method that rewrites the base weight (``pissa``, ``milora``, ``sorsa``) each saved
layer's options carry ``residual=True`` and its fingerprint is that of ``W_res``: loading
wraps the residual without a second SVD or subtraction. A method that leaves the base
alone (``lora``, ``svfit``, ``svft``, …) writes an unchanged copy and a plain adapter.
Under ``torchrun`` (``WORLD_SIZE > 1``) the SVDs are shared as ``adapt`` shares them
(:mod:`spectrakit.adapt.distributed`): the targeted layers are dealt by
``out · in · min(out, in)``; every rank reads every targeted weight and builds every adapter
in order (a layer another rank owns gets a cheap orthonormal stand-in instead of its SVD, so
any random draws happen alike); at the end of each block the owners send their layers'
adapter tensors and residual weights, bit for bit, and rank 0 alone writes ``DIR``.

Methods that plan over the whole model before any layer is built (``eva``'s calibration,
``soma``'s frozen blocks) and ``lq-lora`` are refused in one line.

>>> import tempfile, torch, transformers, spectrakit as sk
>>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
>>> folder = tempfile.mkdtemp()
>>> transformers.GPT2LMHeadModel(config).save_pretrained(folder)
>>> out = sk.adapt_checkpoint(folder, "pissa", rank=4, out=folder + "/pissa")
>>> residual = transformers.GPT2LMHeadModel.from_pretrained(out)
>>> _ = sk.load_adapter(residual, out / "adapter.safetensors")
>>> sk.trainable_parameters(residual)
4096
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn

from .._distributed import agree, distributed_group, exchange, owners
from .._memory import release_freed_memory
from .._progress import progress as progress_bar
from .._shards import DiscardedOutput, ShardedOutput
from .._targets import layer_weight
from ..cache import use_cache
from ..errors import SpectrakitError
from ..weights.checkpoint import Checkpoint
from ..weights.record import natural_key
from .api import _METADATA_KEY, FORMAT, FORMAT_VERSION
from .base import AdaptedLinear, block_index, building, find_targets, fingerprint, get_method, is_conv1d, tied_names
from .distributed import _building

ADAPTER_FILE = "adapter.safetensors"
#: files of a model folder that are weights (not copied: the output has its own)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")
_COPY_LIMIT = 64 * 2**20


def _check_method(method: str, cls: type[AdaptedLinear]) -> None:
    if cls.plan.__func__ is not AdaptedLinear.plan.__func__:  # type: ignore[attr-defined]
        raise SpectrakitError(f"init_from_checkpoint: method {method!r} plans over the whole model before any layer "
                              "is built; adapt it in memory")
    if cls.rewrites_base and "residual" not in cls.__init__.__code__.co_varnames:
        raise SpectrakitError(f"init_from_checkpoint: method {method!r} rewrites the base weight in a way a residual "
                              "checkpoint cannot hold; adapt it in memory")


def init_from_checkpoint(source_dir: str | os.PathLike[str], method: str, rank: int = 8, *,
                         out: str | os.PathLike[str], targets: str | list[str] = "all-linear", cache: Any = None,
                         progress: bool = False, distributed: bool | None = None, **options: Any) -> Path:
    """Initialize ``method``'s adapters from the checkpoint folder ``source_dir`` into ``out``,
    one tensor at a time (see the module docstring); returns ``out``.

    Args:
        source_dir: a Hugging Face checkpoint folder (``config.json`` and safetensors or torch weights).
        method: an adapter method whose layers are built one by one (``pissa``, ``milora``,
            ``sorsa``, ``lora``, ``svfit``, …).
        rank: the method's size, as in :func:`spectrakit.adapt`.
        out: the output folder: the residual checkpoint and ``adapter.safetensors``.
        targets: ``"all-linear"`` (all but the output head) or layer-name patterns.
        cache: a :class:`spectrakit.SpectrumCache` (or its folder) the methods' SVDs read
            and fill (:func:`spectrakit.cache.use_cache`); ``None``: the one in use, if any.
        progress: a progress bar over the tensors.
        distributed: share the SVDs among the ``torchrun`` ranks (``None``: when
            ``WORLD_SIZE > 1``; ``False``: one process); rank 0 writes ``out``.
        **options: the method's options (``alpha=``, ``svd_method=``, …).
    """
    cls = get_method(method)
    _check_method(method, cls)
    cls.check_options(options)
    group = distributed_group(distributed)
    with contextlib.nullcontext() if cache is None else use_cache(cache):  # the methods' SVDs read it
        return _init(source_dir, method, cls, rank, out, targets, progress, options, group)


def _init(source_dir: str | os.PathLike[str], method: str, cls: type[AdaptedLinear], rank: int,
          out: str | os.PathLike[str], targets: str | list[str], progress: bool, options: dict[str, Any],
          ranks: tuple[int, int] | None = None) -> Path:
    this_rank, world = ranks if ranks is not None else (0, 1)
    checkpoint = Checkpoint(source_dir)
    model = checkpoint.skeleton()
    layers = find_targets(model, targets)
    plan = cls.plan(model, layers, rank, options)
    tied = tied_names(model)
    weights: dict[str, str] = {}  # the stored name of each targeted weight -> its layer
    for name, layer in layers.items():
        weight = layer_weight(layer)  # meta: only the shape is read
        if cls.rewrites_base and len(tied.get(id(weight), ())) > 1:
            other = next(n for n in tied[id(weight)] if n != f"{name}.weight")
            raise SpectrakitError(f"layer {name}: its weight is tied to {other}, and {method!r} rewrites the base "
                                  "weight; untie it or choose a method that keeps it (lora, svfit, …)")
        out_f, in_f = (weight.shape[1], weight.shape[0]) if is_conv1d(layer) else weight.shape
        cls.check_layer(name, int(out_f), int(in_f), plan[name])
        weights[checkpoint.stored_name(f"{name}.weight")] = name
    biases = {checkpoint.stored_name(f"{name}.bias"): name for name, layer in layers.items()
              if getattr(layer, "bias", None) is not None and checkpoint.has(f"{name}.bias")}

    adapter: dict[str, torch.Tensor] = {}  # rank 0: this block's adapter tensors, spilled at its end
    parts: list[Path] = []  # the spilled blocks, assembled into adapter.safetensors at the end
    layer_configs: dict[str, Any] = {}
    fingerprints: dict[str, str] = {}
    bias_of = {name: stored_name for stored_name, name in biases.items()}
    stored = sorted(checkpoint.tensors, key=natural_key)
    owner_of = _layer_owners(layers, world)
    # this block's layers whose SVD another rank computes: (stored weight name, base weight if kept, bias)
    awaited: dict[str, tuple[str, torch.Tensor | None, tuple[str, torch.Tensor] | None]] = {}
    asked: list[str] = []  # this block's layers whose method asked for factors (the same on every rank)
    sent: dict[str, dict[str, torch.Tensor]] = {}  # what this rank owns of them: adapter tensors, residual
    notes: dict[str, tuple[Any, str]] = {}  # their configs and fingerprints

    failed: list[BaseException] = []  # under torchrun: this rank's error in the block, reported at its end

    def raise_failure() -> None:
        if failed:
            raise failed[0]

    def settle() -> None:
        """The end of a block: every rank stops if one failed; the shared layers come from their
        owners (rank 0 queues them); then the block's shard."""
        if world == 1:
            output.flush()
            _spill(output.file(ADAPTER_FILE).parent, adapter, parts)
            release_freed_memory()
            return
        agree(raise_failure, f"init {method}")
        received = exchange(sent, {name: owner_of[name] for name in asked})
        every: list[Any] = [None] * world
        torch.distributed.all_gather_object(every, notes)
        agree(partial(write_shared, received, every), "write")
        for pending in (awaited, asked, sent, notes):
            pending.clear()
        release_freed_memory()

    def write_shared(received: dict[str, dict[str, torch.Tensor]], every: list[Any]) -> None:
        for name, (stored_name, base, bias) in awaited.items():
            config, fingerprints[name] = next(part[name] for part in every if name in part)
            layer_configs[name] = config
            tensors = received[name]
            for key, value in tensors.items():
                if key.startswith("t."):
                    adapter[f"{name}.{key[2:]}"] = value
            output.add({stored_name: tensors["residual"] if base is None else base})
            if bias is not None:
                output.add({bias[0]: bias[1]})
        output.flush()
        if this_rank == 0:
            _spill(output.file(ADAPTER_FILE).parent, adapter, parts)

    def build(name: str, stored_name: str) -> None:
        layer = layers[name]
        bias_name = bias_of.get(name)
        parameters = [f"{name}.weight", *([f"{name}.bias"] if bias_name is not None else [])]
        checkpoint.materialize(model, parameters)
        mine = owner_of[name] == this_rank
        with _building(stand_in=not mine) if world > 1 else contextlib.nullcontext() as requests, building(layer):
            wrapped = cls(layer, name=name, **plan[name])  # building: a cache key reuses the constructor's hash
        shared = requests is not None and requests.asked
        config = wrapped.config()
        if cls.rewrites_base:
            config = {**config, "residual": True}
        residual = layer_weight(layer).detach()
        bias = layer.get_parameter("bias").detach() if bias_name is not None else None
        if shared:
            asked.append(name)
        if shared and not mine:  # its owner sends the adapter (and the residual of a method that rewrites it)
            if this_rank == 0:
                kept = None if cls.rewrites_base else residual
                awaited[name] = (stored_name, kept, None if bias is None else (str(bias_name), bias))
        else:
            trainable = {key: value.detach().to("cpu").clone().contiguous()
                         for key, value in wrapped.trainable().items()}
            print_ = fingerprint(residual) if cls.rewrites_base else wrapped.base_fingerprint
            if shared:
                sent[name] = {**{f"t.{key}": value for key, value in trainable.items()},
                              **({"residual": residual} if cls.rewrites_base else {})}
                notes[name] = (config, print_)
            if this_rank == 0:
                adapter.update({f"{name}.{key}": value for key, value in trainable.items()})
                layer_configs[name], fingerprints[name] = config, print_
                output.add({stored_name: residual})
                if bias is not None:
                    output.add({str(bias_name): bias})
        del wrapped, residual, bias
        Checkpoint.release(layer)

    # rank 0 writes; every rank learns at once if the folder cannot be written
    opened: Any = agree(lambda: ShardedOutput(out, marker=ADAPTER_FILE) if this_rank == 0 else DiscardedOutput(), "out")
    with opened as output:
        current: int | None = None
        for stored_name in progress_bar(stored, total=len(stored), desc=f"init {method}",
                                        enabled=progress and this_rank == 0, unit="tensor"):
            group = block_index(stored_name)
            if group != current:  # one shard per block, as the blocks come
                settle()
                current = group
            if stored_name in biases:
                continue  # written with its layer's weight
            if stored_name not in weights:
                if this_rank == 0:  # copied as it is
                    output.add({stored_name: checkpoint.tensors[stored_name].read()})
                continue
            if failed:
                continue
            try:
                build(weights[stored_name], stored_name)
            except Exception as error:  # under torchrun every rank learns of it at the block's end
                if world == 1:
                    raise
                failed.append(error)
        settle()

        def finish() -> None:
            _write_adapter(output.file(ADAPTER_FILE), method, layers, layer_configs, fingerprints, parts)
            output.copy(checkpoint.folder / "config.json")
            for file in sorted(checkpoint.folder.iterdir()):
                if (file.is_file() and file.name != "config.json" and not file.name.endswith(_WEIGHT_SUFFIXES)
                        and not file.name.startswith(".") and file.stat().st_size <= _COPY_LIMIT):
                    output.copy(file)

        agree(finish if this_rank == 0 else lambda: None, "write")
        output.commit()  # the folder appears only once every rank got here
    return Path(out)


def _layer_owners(layers: Mapping[str, nn.Module], world: int) -> dict[str, int]:
    """Each targeted layer's rank: ``out · in · min(out, in)`` dealt by the LPT rule (shapes from the skeleton)."""
    names = list(layers)
    costs = []
    for name in names:
        rows, cols = layer_weight(layers[name]).shape
        costs.append(float(rows * cols * min(rows, cols)))
    deal = owners(costs, world)
    return {name: deal[i] for i, name in enumerate(names)}


def _spill(folder: Path, tensors: dict[str, torch.Tensor], parts: list[Path]) -> None:
    """Write one block's adapter tensors to a part file beside the output and let them go."""
    if not tensors:
        return
    from safetensors.torch import save_file

    part = folder / f".adapter-part-{len(parts):05d}.safetensors"
    save_file(tensors, str(part))
    parts.append(part)
    tensors.clear()


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (without ``__metadata__``) and where its data starts."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _write_adapter(path: Path, method: str, layers: Iterable[str], configs: dict[str, Any],
                   fingerprints: dict[str, str], parts: list[Path]) -> None:
    """``adapter.safetensors`` in :func:`~spectrakit.save_adapter`'s format, assembled from the
    blocks' part files (their data copied in chunks, so the adapter is never held whole); the
    parts are removed."""

    order = list(layers)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "method": method,
              "layers": {name: configs[name] for name in order},
              "fingerprints": {name: fingerprints[name] for name in order}}
    header: dict[str, Any] = {"__metadata__": {_METADATA_KEY: json.dumps(config)}}
    offset, layout = 0, []
    for part in parts:
        entries, start = _header(part)
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                            "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        layout.append((part, start, max((e["data_offsets"][1] for e in entries.values()), default=0)))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for part, start, length in layout:
            with open(part, "rb") as source:
                source.seek(start)
                _copy_exactly(source, handle, length, 16 * 2**20)
            part.unlink()


def _copy_exactly(source: Any, target: Any, length: int, chunk: int) -> None:
    left = length
    while left > 0:
        data = source.read(min(chunk, left))
        if not data:
            raise SpectrakitError(f"{source.name}: ended {left} bytes early")
        target.write(data)
        left -= len(data)
