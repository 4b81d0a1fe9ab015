"""Real data that is already on the machine, with fixed train/validation splits.

Nothing here downloads anything. Three sources are used:

* **Python code** -- the ``.py`` sources of the running interpreter's standard
  library (:func:`code_files`, :func:`code_corpus`). This is what the bundled
  reference model (:mod:`spectrakit.reference`) was pretrained on.
* **English prose** -- the Python reference documentation that CPython ships as
  ``pydoc_data/topics.py`` (:func:`docs_corpus`). Code -> docs is a real domain
  shift, useful for adapter fine-tuning experiments.
* **Images** -- scikit-learn's bundled 8x8 handwritten digits (:func:`digits`).

Every split is fixed and deterministic: files and topics go to ``"validation"``
according to a SHA-1 hash of their name, never according to random state or the
order in which the file system lists them. The corpora do depend on the Python
version (each CPython release ships slightly different sources).

>>> from spectrakit import data
>>> train = data.code_corpus("train", max_bytes=1_000_000)
>>> for x in data.byte_batches(train, batch_size=8, seq_len=128, steps=2):
...     inputs, targets = x[:, :-1], x[:, 1:]

Only ``torch`` and ``numpy`` are needed to import this module; :func:`digits`
imports scikit-learn when called.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from spectrakit.errors import SpectrakitError

__all__ = [
    "SPLITS",
    "stdlib_root",
    "code_files",
    "code_corpus",
    "docs_corpus",
    "digits",
    "byte_batches",
    "eval_windows",
]

#: The split names every function here accepts.
SPLITS = ("train", "validation")

#: Per cent of stdlib files that go to the validation split.
CODE_VALIDATION_PERCENT = 5
#: Per cent of documentation topics that go to the validation split.
DOCS_VALIDATION_PERCENT = 10
#: Files larger than this are skipped as (mostly) generated tables.
CODE_MAX_FILE_BYTES = 500_000
#: Separator placed between concatenated files / topics.
SEPARATOR = b"\n\n"

# Directory names (anywhere in the relative path) that are not part of the code corpus.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "pydoc_data"})


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise SpectrakitError(f"unknown split {split!r}: expected one of {', '.join(map(repr, SPLITS))}")
    return split


def _bucket(name: str) -> int:
    """A stable number in [0, 100) derived from ``name`` (same on every machine and run)."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) % 100


def _split_of(name: str, validation_percent: int) -> str:
    return "validation" if _bucket(name) < validation_percent else "train"


def stdlib_root() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def _code_files(split: str) -> tuple[Path, ...]:
    root = stdlib_root()
    if not root.is_dir():
        raise SpectrakitError(f"the Python standard library was not found at {root}")
    chosen: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked dirs
        rel_dir = Path(dirpath).relative_to(root)
        # prune excluded directories and per-build config dirs (config-3.x-...)
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if path.stat().st_size > CODE_MAX_FILE_BYTES:
                continue
            rel = (rel_dir / name).as_posix()
            if _split_of(rel, CODE_VALIDATION_PERCENT) == split:
                chosen.append((rel, path))
    chosen.sort(key=lambda item: item[0])
    return tuple(path for _, path in chosen)


def code_files(split: str = "train") -> list[Path]:
    """The stdlib ``.py`` files of one split, sorted by path relative to the stdlib root.

    Excluded: ``site-packages``, ``test``/``tests`` directories, ``idlelib``,
    ``pydoc_data`` (that is the prose corpus), per-build ``config-*`` and
    ``_sysconfigdata*`` files, and files over 500 kB. A file is in
    ``"validation"`` when the SHA-1 of its relative POSIX path falls in the first
    5 of 100 buckets (about 5 % of files).

    >>> files = code_files("validation")
    >>> files[0].suffix
    '.py'
    """
    return list(_code_files(_check_split(split)))


@functools.lru_cache(maxsize=2)
def _code_corpus(split: str) -> bytes:
    return SEPARATOR.join(path.read_bytes() for path in _code_files(split))


def code_corpus(split: str = "train", max_bytes: int | None = None) -> bytes:
    """The files of :func:`code_files` concatenated (separated by a blank line).

    ``max_bytes`` truncates the result. About 10 MB for ``"train"`` and 0.5 MB
    for ``"validation"`` on CPython 3.11.

    Args:
        split: ``"train"`` or ``"validation"`` (a fixed split by file name).
        max_bytes: truncate to this many bytes.

    >>> code = code_corpus("validation", max_bytes=10_000)
    >>> len(code)
    10000
    """
    corpus = _code_corpus(_check_split(split))
    if max_bytes is not None:
        if max_bytes < 0:
            raise SpectrakitError(f"max_bytes must be >= 0, got {max_bytes}")
        corpus = corpus[:max_bytes]
    return corpus


def docs_corpus(split: str = "train") -> bytes:
    """English prose: the ``split`` (``"train"`` or ``"validation"``) of the Python reference
    documentation shipped in ``pydoc_data.topics``.

    Each topic (``'if'``, ``'numbers'``, ...) goes to ``"validation"`` when the
    SHA-1 of its key falls in the first 10 of 100 buckets; the topics are
    concatenated in sorted key order, UTF-8 encoded.

    >>> prose = docs_corpus("validation")
    >>> prose[:4]
    b'Basi'
    """
    _check_split(split)
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - some distributions strip it
        raise SpectrakitError("pydoc_data.topics is missing from this Python installation") from exc
    keys = sorted(k for k in topics if _split_of(k, DOCS_VALIDATION_PERCENT) == split)
    return SEPARATOR.join(topics[k].encode("utf-8") for k in keys)


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits as ``(X, y)``.

    ``X`` is float32 ``[n, 64]`` scaled to [0, 1]; ``y`` is int64 ``[n]``. The split
    is a fixed permutation (``torch.Generator`` seeded 0): the first 80 % of the
    1,797 images are ``"train"``, the rest ``"validation"``.

    >>> X, y = digits("validation")  # doctest: +SKIP
    >>> X.shape, y.shape  # doctest: +SKIP
    (torch.Size([360, 64]), torch.Size([360]))
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SpectrakitError("digits() needs scikit-learn: pip install 'spectrakit[data]'") from exc
    bunch = load_digits()
    X = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(round(0.8 * len(y)))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    idx, _ = torch.sort(idx)
    return X[idx].contiguous(), y[idx].contiguous()


def _as_uint8(data: bytes | bytearray | memoryview) -> torch.Tensor:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SpectrakitError(f"data must be bytes, got {type(data).__name__}")
    return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())


def byte_batches(
    data: bytes,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    steps: int | None = None,
) -> Iterator[torch.Tensor]:
    """Random training windows of a byte string, for byte-level language modelling.

    Yields LongTensors of shape ``[batch_size, seq_len + 1]`` holding byte values
    0..255, each row starting at an offset drawn with ``torch.Generator(seed)``
    (the global RNG is not touched, so equal seeds give equal batches). Use
    ``x[:, :-1]`` as inputs and ``x[:, 1:]`` as targets. ``steps=None`` yields
    forever.

    Args:
        data: the byte string (e.g. :func:`code_corpus`).
        batch_size: rows per batch.
        seq_len: input bytes per row (each row holds one more, the last target).
        seed: seed of the window offsets.
        steps: how many batches, or ``None`` for an endless stream.

    >>> batches = byte_batches(b"abcdefgh" * 100, batch_size=4, seq_len=16, steps=3)
    >>> [tuple(x.shape) for x in batches]
    [(4, 17), (4, 17), (4, 17)]
    """
    if batch_size < 1 or seq_len < 1:
        raise SpectrakitError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if steps is not None and steps < 0:
        raise SpectrakitError(f"steps must be >= 0 or None, got {steps}")
    buf = _as_uint8(data)
    n_start = buf.numel() - seq_len  # valid starts: 0 .. len - (seq_len + 1)
    if n_start < 1:
        raise SpectrakitError(f"data has {buf.numel()} bytes, need at least seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    span = torch.arange(seq_len + 1)

    def _gen() -> Iterator[torch.Tensor]:
        step = 0
        while steps is None or step < steps:
            starts = torch.randint(0, n_start, (batch_size,), generator=gen)
            yield buf[starts[:, None] + span].long()
            step += 1

    return _gen()


def eval_windows(data: bytes, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Deterministic, non-overlapping evaluation windows of a byte string.

    Returns a LongTensor ``[n, seq_len + 1]`` (inputs ``x[:, :-1]``, targets
    ``x[:, 1:]``). The windows are spread evenly over the whole of ``data`` (not
    just its beginning), at most ``max_windows`` of them (``None``: every
    consecutive window).

    >>> eval_windows(b"x" * 1000, seq_len=99, max_windows=4).shape
    torch.Size([4, 100])
    """
    if seq_len < 1:
        raise SpectrakitError(f"seq_len must be >= 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise SpectrakitError(f"max_windows must be >= 1 or None, got {max_windows}")
    buf = _as_uint8(data)
    width = seq_len + 1
    n_fit = buf.numel() // width
    if n_fit < 1:
        raise SpectrakitError(f"data has {buf.numel()} bytes, need at least seq_len + 1 = {width}")
    n = n_fit if max_windows is None else min(max_windows, n_fit)
    # start k at floor(k * n_fit / n) * width: distinct multiples of width, so no overlap
    starts = (torch.arange(n) * n_fit // n) * width
    return buf[starts[:, None] + torch.arange(width)].long()
