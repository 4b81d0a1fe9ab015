"""Weight matrices from checkpoint files, read lazily, one tensor at a time.

Supported sources:

* a ``.safetensors`` file — shapes and dtypes come from its header; a tensor's
  bytes are read only when its record is loaded;
* a Hugging Face folder — ``model.safetensors.index.json`` (sharded),
  ``model.safetensors``, ``pytorch_model.bin.index.json``,
  ``pytorch_model.bin``, or else every ``*.safetensors`` file in it;
* a PyTorch ``.bin`` / ``.pt`` / ``.pth`` checkpoint, opened with
  ``torch.load(weights_only=True, mmap=True)`` so nothing is unpickled beyond
  tensors and containers, and tensor bytes stay on disk until touched (legacy
  non-zip checkpoints cannot be memory-mapped and are read whole);
* an in-memory state dict.

Files carry no layer types, so the kind comes from name and shape: a 2-D
tensor is ``embedding`` when its name looks like one (``embed_tokens``,
``wte``, ``word_embeddings``, ``shared``...), else ``linear`` if it is a
``.weight``, else ``matrix``; a 3-D / 4-D ``.weight`` is ``conv1d`` / ``conv2d``
(other 3-D / 4-D tensors are ``matrix``). 0-D, 1-D, >4-D tensors and anything
named ``*bias`` are not reported.

GPT-2 style models store their ``Conv1D`` weights as ``(in, out)``. To report
the same ``(out, in)`` as :func:`~spectrakit.weights.module.iter_module_matrices`,
``c_attn``/``c_proj``/``c_fc``/``q_attn`` weights are transposed when a
``config.json`` beside the file names such a model (gpt2, openai-gpt,
decision_transformer, imagegpt, clvp), or, without a config, when their names
appear and ``c_attn``/``c_fc`` are stored wide (fewer rows than columns, as
``(in, 3·in)`` is), which tells GPT-2 apart from models that reuse those names
on ``nn.Linear`` (GPT-BigCode, Qwen), stored tall. ``transposed=[patterns]`` overrides all of this.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"h.0.attn.c_attn.weight": torch.zeros(8, 24)}, path)
    >>> [(r.name, r.shape) for r in path_records(path)]
    [('h.0.attn.c_attn.weight', (24, 8))]
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from spectrakit.errors import SpectrakitError
from spectrakit.weights.record import MatrixRecord, matches_any, natural_key, one_line

__all__ = ["path_records", "safetensors_dtypes", "state_dict_records", "stored_tensors"]

#: ``model_type`` values whose linear layers are transformers ``Conv1D``.
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"}
)
_CONV1D_WEIGHT = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
# Only these two are non-square in GPT-2, so only they reveal the layout.
_CONV1D_WIDE_WEIGHT = re.compile(r"(^|\.)(c_attn|c_fc)\.weight$")

_EMBEDDING_LEAF = re.compile(r"embed|^wte$|^wpe$|^shared$")
_NOT_EMBEDDING_LEAF = frozenset({"embed_out"})  # GPT-NeoX's output head is a Linear

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr)
    for code, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
        "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}


@dataclass
class _Entry:
    """One stored tensor, described without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    read: Callable[[], torch.Tensor]
    tie_key: Hashable | None = None  # entries with equal keys are one tensor
    meta: bool = False


# -- public entry points -------------------------------------------------------


def path_records(
    path: str | os.PathLike[str], *, transposed: Sequence[str] | None = None
) -> list[MatrixRecord]:
    """Describe every weight matrix in a checkpoint file or folder, in natural name order.

    Only headers (safetensors) or memory maps (torch) are read here; each
    record's :meth:`~MatrixRecord.load` reads its own tensor.

    Args:
        path: a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, an
            ``*.index.json``, or a Hugging Face model folder.
        transposed: name patterns of 2-D weights stored ``(in, out)``; ``None``
            detects GPT-2 style ``Conv1D`` weights, ``[]`` transposes nothing.

    Raises:
        SpectrakitError: missing path, unknown file type, corrupt or refused file,
            missing shard — naming the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SpectrakitError(f"{path}: no such file or directory")
    folder = path if path.is_dir() else path.parent
    entries = _folder_entries(path) if path.is_dir() else _file_entries(path)
    is_transposed = _transposition_rule(entries, transposed, _config_model_type(folder))
    records = _records_from_entries(entries, is_transposed)
    return sorted(records, key=lambda record: natural_key(record.name))


def state_dict_records(
    state_dict: Mapping[str, object],
    *,
    transposed: Sequence[str] | None = None,
    source: str = "state_dict",
) -> list[MatrixRecord]:
    """Describe the weight matrices of an in-memory state dict, in its own order.

    Non-tensor values are ignored; a ``{"state_dict": ...}``, ``{"model": ...}`` or
    ``{"model_state": ...}`` wrapper is unwrapped. Tensors that are the same storage view (tied
    weights) become one record with aliases.

    Example::

        >>> import torch
        >>> shared = torch.zeros(10, 4)
        >>> records = state_dict_records({"embed.weight": shared, "head.weight": shared})
        >>> [(r.name, r.kind, r.aliases) for r in records]
        [('embed.weight', 'embedding', ('head.weight',))]
    """
    tensors = _tensors_of(state_dict, source)
    entries = [_tensor_entry(name, tensor, source) for name, tensor in tensors.items()]
    is_transposed = _transposition_rule(entries, transposed, model_type=None)
    return _records_from_entries(entries, is_transposed)


# -- turning entries into records -------------------------------------------------


def _records_from_entries(
    entries: list[_Entry], is_transposed: Callable[[list[str]], bool]
) -> list[MatrixRecord]:
    groups: dict[Hashable, list[_Entry]] = {}
    for index, entry in enumerate(entries):
        key = entry.tie_key if entry.tie_key is not None else ("untied", index)
        groups.setdefault(key, []).append(entry)

    records = []
    for group in groups.values():
        first = group[0]
        kind = file_kind(first.name, len(first.shape))
        if kind is None:
            continue
        names = [entry.name for entry in group]
        transpose = len(first.shape) == 2 and is_transposed(names)
        records.append(
            MatrixRecord(
                name=first.name,
                kind=kind,
                shape=first.shape[::-1] if transpose else first.shape,
                dtype=first.dtype,
                source=first.source,
                aliases=tuple(names[1:]),
                _loader=first.read,
                _transposed=transpose,
                _meta=first.meta,
            )
        )
    return records


def file_kind(name: str, ndim: int) -> str | None:
    """The record kind of a stored tensor from its name and rank; None to skip it.

    Example::

        >>> file_kind("model.embed_tokens.weight", 2), file_kind("conv.weight", 4)
        ('embedding', 'conv2d')
        >>> file_kind("h.0.attn.bias", 4) is None
        True
    """
    parts = name.rsplit(".", 2)
    leaf = parts[-1]
    if ndim < 2 or ndim > 4 or leaf.endswith("bias"):
        # GPT-2 checkpoints carry a 4-D causal mask named "attn.bias".
        return None
    is_weight = leaf == "weight"
    if ndim == 2:
        owner = parts[-2] if is_weight and len(parts) > 1 else leaf
        if _EMBEDDING_LEAF.search(owner) and owner not in _NOT_EMBEDDING_LEAF:
            return "embedding"
        return "linear" if is_weight else "matrix"
    if not is_weight:
        return "matrix"  # e.g. a (1, tokens, dim) position table
    return "conv1d" if ndim == 3 else "conv2d"


def _transposition_rule(
    entries: list[_Entry], transposed: Sequence[str] | None, model_type: str | None
) -> Callable[[list[str]], bool]:
    """Decide which 2-D weights are stored (in, out); see the module docstring."""
    if transposed is not None:
        patterns = [transposed] if isinstance(transposed, str) else list(transposed)
        return lambda names: matches_any(names, patterns)

    def conv1d_named(names: list[str]) -> bool:
        return any(_CONV1D_WEIGHT.search(name) for name in names)

    def never(names: list[str]) -> bool:
        return False

    if model_type is not None:
        return conv1d_named if model_type in CONV1D_MODEL_TYPES else never
    wide = [
        entry.shape[1] > entry.shape[0]
        for entry in entries
        if len(entry.shape) == 2 and _CONV1D_WIDE_WEIGHT.search(entry.name)
    ]
    if wide and sum(wide) * 2 < len(wide):
        return never  # c_attn / c_fc stored tall: they are nn.Linear (out, in)
    return conv1d_named


# -- safetensors --------------------------------------------------------------------


def _read_safetensors_tensor(path: str, name: str) -> torch.Tensor:
    """Read one tensor's bytes. The only place safetensors data is touched.

    The bytes go straight from the file into the tensor's own memory (one copy, no
    memory map whose touched pages would also count against the process while the
    tensor is in use), so streaming a file costs about its largest tensor.
    """
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        info = json.loads(handle.read(header_size))[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - start:
            raise SpectrakitError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
        handle.seek(8 + header_size + start)
        if handle.readinto(buffer.data) != buffer.nbytes:  # ndarray.data: a writable memoryview
            raise SpectrakitError(f"{path}: file ends inside tensor {name} (truncated?)")
    return tensor


def _safetensors_entries(path: Path, only: set[str] | None = None) -> list[_Entry]:
    source = str(path)
    if not path.is_file():
        raise SpectrakitError(f"{path}: no such file or directory")
    header: list[tuple[str, tuple[int, ...], str]] = []
    try:
        with safe_open(source, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if only is None or name in only:
                    view = handle.get_slice(name)
                    header.append((name, tuple(view.get_shape()), view.get_dtype()))
    except Exception as error:  # SafetensorError, OSError: corrupt or truncated file
        raise SpectrakitError(
            f"{path}: not a valid safetensors file ({one_line(error)})"
        ) from error

    entries = []
    for name, shape, dtype_code in header:
        dtype = _SAFETENSORS_DTYPES.get(dtype_code)
        if dtype is None:
            continue  # a dtype torch cannot hold (e.g. 4-bit floats): not loadable here
        entries.append(
            _Entry(name, shape, dtype, source, _safetensors_reader(source, name))
        )
    return entries


def stored_tensors(path: str | os.PathLike[str]) -> dict[str, _Entry]:
    """Every tensor of a checkpoint file or folder, not only its matrices, by stored name.

    Each entry has the ``name``, ``shape`` and ``dtype`` from the header (safetensors) or
    memory map (torch) and a ``read()`` that loads that one tensor as stored (no
    transposition, no dtype change); nothing else is read. The block-by-block verbs
    (:mod:`spectrakit.weights.checkpoint`) load norms and biases through it as well.

    Args:
        path: a checkpoint file, an ``*.index.json`` or a Hugging Face model folder.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SpectrakitError(f"{path}: no such file or directory")
    entries = _folder_entries(path) if path.is_dir() else _file_entries(path)
    return {entry.name: entry for entry in entries}


def safetensors_dtypes(path: str | os.PathLike) -> dict[str, torch.dtype]:
    """The dtype of each tensor in a safetensors file, from its header alone."""
    return {entry.name: entry.dtype for entry in _safetensors_entries(Path(path))}


def _safetensors_reader(source: str, name: str) -> Callable[[], torch.Tensor]:
    # Looks the reader up at call time so tests can observe every data read.
    return lambda: _read_safetensors_tensor(source, name)


# -- torch checkpoints ----------------------------------------------------------------


def _torch_entries(path: Path) -> list[_Entry]:
    tensors = _tensors_of(_torch_load(path), str(path))
    return [_tensor_entry(name, tensor, str(path)) for name, tensor in tensors.items()]


def _torch_load(path: Path) -> object:
    """``torch.load`` that only unpickles tensors, and fails with one clear line."""
    if not path.is_file():
        raise SpectrakitError(f"{path}: no such file or directory")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as handle:
            # Legacy torch.save files are a pickle stream, which starts with PROTO.
            if handle.read(1) != b"\x80":
                raise SpectrakitError(f"{path}: not a PyTorch checkpoint (unrecognized bytes)")
    try:
        with warnings.catch_warnings():
            # A plain pickle makes torch warn about its protocol before refusing
            # it; the refusal below already says all a user needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # Zip checkpoints can be memory-mapped: tensor bytes stay on disk until used.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        # not torch's advice to load with weights_only=False: spectrakit never does
        raise SpectrakitError(
            f"{path}: refused to load: it holds more than tensors ({_weights_only_reason(error)}), and "
            "spectrakit never unpickles other objects. If you trust the file, convert it to safetensors once, "
            f"in your own Python: safetensors.torch.save_file(torch.load('{path}', weights_only=False), "
            f"'{path.with_suffix('.safetensors').name}') (a state dict of tensors), then analyze that file"
        ) from error
    except Exception as error:  # RuntimeError, EOFError, ...: corrupt or truncated
        raise SpectrakitError(
            f"{path}: not a readable PyTorch checkpoint ({one_line(error)})"
        ) from error


def _weights_only_reason(error: BaseException) -> str:
    """The useful sentence of torch's long weights-only refusal message."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    # the first sentence, without torch's own advice (add_safe_globals, weights_only=False)
    reason = one_line(ValueError(text)).split(". ", 1)[0]
    return reason if "weights_only" not in reason else "an object that is not a tensor"


def _tensors_of(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The name → tensor mapping inside a loaded checkpoint."""
    if not isinstance(obj, Mapping):
        raise SpectrakitError(
            f"{source}: expected a state dict (names to tensors), found {type(obj).__name__}"
        )
    for wrapper_key in ("state_dict", "model", "model_state"):
        inner = obj.get(wrapper_key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    return {
        name: value
        for name, value in obj.items()
        if isinstance(name, str) and isinstance(value, torch.Tensor)
    }


def _tensor_entry(name: str, tensor: torch.Tensor, source: str) -> _Entry:
    return _Entry(
        name=name,
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        source=source,
        read=lambda: tensor,
        tie_key=_tie_key(tensor),
        meta=tensor.is_meta,
    )


def _tie_key(tensor: torch.Tensor) -> Hashable | None:
    """Equal for two names of one tensor: same storage, same view of it."""
    if tensor.is_meta or tensor.numel() == 0:
        return None  # no storage address to compare
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


# -- files and folders ---------------------------------------------------------------


def _file_entries(path: Path) -> list[_Entry]:
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_entries(path)
    if name.endswith(".safetensors.index.json"):
        return _sharded_entries(path, _safetensors_entries)
    if name.endswith(".bin.index.json"):
        return _sharded_entries(path, lambda shard, only: _select(_torch_entries(shard), only))
    if name.endswith(_TORCH_SUFFIXES):
        return _torch_entries(path)
    raise SpectrakitError(
        f"{path}: unknown file type (expected .safetensors, .bin, .pt, .pth or a folder)"
    )


def _folder_entries(folder: Path) -> list[_Entry]:
    for candidate in (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ):
        if (folder / candidate).is_file():
            return _file_entries(folder / candidate)
    files = sorted(folder.glob("*.safetensors"), key=lambda p: natural_key(p.name))
    if not files:
        raise SpectrakitError(
            f"{folder}: no weights found (expected model.safetensors, an index JSON, "
            "pytorch_model.bin or *.safetensors files)"
        )
    entries: list[_Entry] = []
    seen: dict[str, str] = {}
    for file in files:
        for entry in _safetensors_entries(file):
            if entry.name in seen:
                raise SpectrakitError(
                    f"{folder}: tensor {entry.name!r} is in both {seen[entry.name]} and "
                    f"{file.name}; pass one file"
                )
            seen[entry.name] = file.name
            entries.append(entry)
    return entries


def _sharded_entries(
    index_path: Path, read_shard: Callable[[Path, set[str]], list[_Entry]]
) -> list[_Entry]:
    """Entries of every shard an index's ``weight_map`` lists."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as error:
        raise SpectrakitError(
            f"{index_path}: not a valid index file ({one_line(error)})"
        ) from error

    names_by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        names_by_shard.setdefault(str(shard), set()).add(name)
    entries: list[_Entry] = []
    for shard, names in names_by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise SpectrakitError(
                f"{shard_path}: shard listed in {index_path.name} is missing"
            )
        found = read_shard(shard_path, names)
        missing = names - {entry.name for entry in found}
        if missing:
            raise SpectrakitError(
                f"{shard_path}: tensor {sorted(missing)[0]!r} listed in "
                f"{index_path.name} is not in this shard"
            )
        entries.extend(found)
    return entries


def _select(entries: list[_Entry], names: set[str]) -> list[_Entry]:
    return [entry for entry in entries if entry.name in names]


def _config_model_type(folder: Path) -> str | None:
    """``model_type`` from a ``config.json`` in ``folder``, if there is a readable one."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # no config, or not ours to judge: it is only a layout hint
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None
