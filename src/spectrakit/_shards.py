"""A checkpoint folder written shard by shard, all or nothing.

:class:`ShardedOutput` writes into a hidden folder beside the target
(``.NAME.tmp-XXXX``). Tensors are added a group at a time (one decoder block) and each
:meth:`~ShardedOutput.flush` writes the pending group as one safetensors shard and lets it
go, so memory holds one group. :meth:`~ShardedOutput.commit` names the shards
``model-00001-of-0000N.safetensors``, writes ``model.safetensors.index.json`` (the layout
``transformers`` and :func:`spectrakit.weights.iter_matrices` read) and only then puts the
folder in place by renaming it. An error, Ctrl-C or kill before that leaves the target as
it was; a folder it replaces is one spectrakit wrote (it holds ``marker``).

>>> import tempfile, torch, pathlib
>>> target = pathlib.Path(tempfile.mkdtemp()) / "out"
>>> with ShardedOutput(target, marker="compress.json") as output:
...     output.add({"a": torch.zeros(2)}); output.flush()
...     output.write_json("compress.json", {"format": "demo"})
>>> sorted(p.name for p in target.iterdir())
['compress.json', 'model-00001-of-00001.safetensors', 'model.safetensors.index.json']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ._atomic import _new_file_mode
from .errors import SpectrakitError

INDEX = "model.safetensors.index.json"


class ShardedOutput:
    """An output folder built in a temporary folder beside it and renamed into place.

    Args:
        path: the folder to write. If it exists it must be empty or hold ``marker``
            (an earlier output of the same kind, replaced as a whole).
        marker: the file that marks a complete output of this kind (``compress.json``).
    """

    def __init__(self, path: str | os.PathLike[str], *, marker: str) -> None:
        self.path = Path(path)
        self.marker = marker
        if self.path.exists():
            if not self.path.is_dir():
                raise SpectrakitError(f"out={self.path}: exists and is not a folder")
            if any(self.path.iterdir()) and not (self.path / marker).is_file():
                raise SpectrakitError(f"out={self.path}: the folder is not empty and was not written by spectrakit "
                                      f"(no {marker}); choose an empty or new folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self.done = False

    def __enter__(self) -> ShardedOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None and not self.done:
            self.commit()
        elif kind is not None:
            self.abort()

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Queue tensors for the next shard (copied to contiguous CPU memory if they are not).

        Args:
            tensors: name → tensor; a name given twice is an error.
        """
        for name, tensor in tensors.items():
            if name in self.pending or any(name in names for _, names in self.shards):
                raise SpectrakitError(f"tensor {name} is written twice")
            self.pending[name] = tensor.detach().to("cpu").contiguous()

    def flush(self) -> None:
        """Write the queued tensors as one shard and let them go (nothing queued: no shard)."""
        if not self.pending:
            return
        file = self.tmp / f"model-{len(self.shards) + 1:05d}.safetensors"
        write_safetensors(file, self.pending, {"format": "pt"})
        self.total_size += sum(t.numel() * t.element_size() for t in self.pending.values())
        self.shards.append((file, list(self.pending)))
        self.pending = {}

    def write_json(self, name: str, value: Any) -> None:
        """Write a JSON file into the output.

        Args:
            name: the file name inside the folder.
            value: anything ``json.dump`` takes.
        """
        with open(self.tmp / name, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)

    def write_text(self, name: str, text: str) -> None:
        """Write a text file into the output.

        Args:
            name: the file name inside the folder.
            text: its content.
        """
        (self.tmp / name).write_text(text, encoding="utf-8")

    def copy(self, source: Path) -> None:
        """Copy a file (a tokenizer file, ``generation_config.json``) into the output.

        Args:
            source: the file to copy; it keeps its name.
        """
        shutil.copyfile(source, self.tmp / source.name)

    def file(self, name: str) -> Path:
        """The path of ``name`` inside the folder being written (for writers that open it).

        Args:
            name: the file name.
        """
        return self.tmp / name

    def commit(self) -> Path:
        """Write the index and put the folder in place; returns its path."""
        self.flush()
        weight_map: dict[str, str] = {}
        count = len(self.shards)
        for number, (file, names) in enumerate(self.shards, 1):
            final = file.with_name(f"model-{number:05d}-of-{count:05d}.safetensors")
            file.rename(final)
            weight_map.update((name, final.name) for name in names)
        self.write_json(INDEX, {"metadata": {"total_size": self.total_size}, "weight_map": weight_map})
        mode = _new_file_mode()
        os.chmod(self.tmp, mode | (mode & 0o444) >> 2)  # mkdtemp makes it private; x where r

        old = None
        if self.path.exists():  # move the old output aside, then the new one in, then drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "folder")
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary folder; the target is left as it was."""
        self.done = True
        self.pending = {}
        shutil.rmtree(self.tmp, ignore_errors=True)



#: safetensors' names of the torch dtypes
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class DiscardedOutput:
    """What a ``torchrun`` rank other than 0 writes into: nothing (rank 0 writes the output).
    It takes every call a :class:`ShardedOutput` takes."""

    def __enter__(self) -> DiscardedOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add(self, tensors: Any) -> None:
        """Drops ``tensors`` (args: ``tensors``, what rank 0 would write)."""

    def flush(self) -> None:
        """Nothing to write."""

    def write_text(self, name: str, text: str) -> None:
        """Drops a text file (args: ``name``, ``text``)."""

    def write_json(self, name: str, value: Any) -> None:
        """Drops a JSON file (args: ``name``, ``value``)."""

    def copy(self, source: Path) -> None:
        """Drops a copied file (args: ``source``)."""

    def commit(self) -> None:
        """Nothing to put in place."""


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save_file`` first copies every tensor into one ``bytes`` object, so a
    shard briefly costs twice its size; here the header is written, then each (CPU,
    contiguous) tensor's bytes straight from its storage.

    Args:
        path: the file to write.
        tensors: name → CPU contiguous tensor, in the order the data is laid out.
        metadata: the header's ``__metadata__`` (strings).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise SpectrakitError(f"tensor {name}: dtype {tensor.dtype} cannot be written to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def shard_files(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` lists, in order, each checked to exist.

    Args:
        index: the index file.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(str(shard) for shard in weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SpectrakitError(f"{index}: not a valid index file ({error})") from None
    files = [index.parent / name for name in names]
    missing = [file for file in files if not file.is_file()]
    if missing:
        raise SpectrakitError(f"{missing[0]}: shard listed in {index.name} is missing")
    return files


def load_shards(model: torch.nn.Module, files: list[Path], *, assign: bool = False) -> None:
    """Load a state dict stored in several safetensors files into ``model``, one file at a
    time, strictly: every tensor must be the model's, and every parameter or persistent
    buffer of the model must be in some file, save the second names of tied parameters
    (stored once, as ``safetensors.torch.save_model`` does).

    Args:
        model: the model.
        files: the shard files.
        assign: put the loaded tensors in place of the model's (a model whose parameters are
            on the meta device); tied parameters are tied again afterwards. Otherwise the
            loaded values are copied into the model's tensors.
    """
    from safetensors.torch import load_file

    expected = set(model.state_dict())
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    seen: set[str] = set()
    for file in files:
        part = load_file(str(file))
        result = model.load_state_dict(part, strict=False, assign=assign)
        if result.unexpected_keys:
            raise SpectrakitError(f"{file}: tensor {result.unexpected_keys[0]} is not in the model")
        seen.update(part)
        del part
    tied = {name for names in groups.values() if any(n in seen for n in names) for name in names}
    missing = sorted(expected - seen - tied)
    if missing:
        raise SpectrakitError(f"{files[0].parent}: no shard holds tensor {missing[0]}")
    if assign:  # every name of a tied parameter points at the one loaded tensor again
        for names in groups.values():
            loaded = next(n for n in names if n in seen)
            owner, _, leaf = loaded.rpartition(".")
            kept = model.get_submodule(owner)._parameters[leaf]
            for name in names:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = kept
