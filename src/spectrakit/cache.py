"""A spectrum cache on disk, shared by ``analyze``, ``adapt`` and ``compress``.

Each entry is the result of one spectral computation on one matrix ``W``, stored under

.. math::  \\text{key} = (\\operatorname{sha256}(\\text{dtype} \\,|\\, \\text{shape} \\,|\\, \\text{bytes of } W),
           \\ \\text{layout},\\ \\text{dtype},\\ \\text{device},\\ \\text{method},
           \\ \\text{which},\\ \\text{versions}),\\qquad k

so a weight changed in place (one bit is enough) has another key and is recomputed, never served
from a stale entry. ``method`` names what was computed and how (``"svdvals:auto:None"``,
``"adapt-svd:krylov:float32"``, …) and ``which`` whether the entry holds the top or bottom
triplets (or a whole result); the spectrakit and torch versions are part of the key, so an
upgrade that changes a solver's rounding recomputes. For top-``k`` factors (``U``, ``S``, ``Vh``), an entry
computed for ``k`` serves any ``k' ≤ k``: the leading ``k'`` triplets of the stored ones (the
trailing ones for bottom triplets). A hit returns the stored tensors bit for bit, so a cached run
gives the results of the run that filled the cache.

Layout of the folder::

    DIR/index.json                               the index: one entry per key (file, bytes, hash, k, …)
    DIR/shards/ab/<key hash>-k<k>-<token>.safetensors   the tensors of one entry
    DIR/.lock                                    serializes writers (POSIX flock)

Guarantees:

* **Atomic writes.** A shard is written to a temporary file and renamed into place, and only
  then listed in the index (itself replaced atomically); both happen while the writer holds the
  folder's lock. A process killed at any point leaves either nothing, a temporary file (never
  read), or a complete shard that the index does not list (refused and recomputed).
* **Refusal of damaged shards.** Before a shard is read, its size and SHA-256 hash are checked
  against the index; a truncated, garbled or unlisted shard, and a garbled index entry, are
  refused with one :class:`CacheWarning` line naming the file, and the value is recomputed and
  written again. An unreadable index is refused the same way (one line); every entry is then
  recomputed, and the shards it listed are removed (without a line each) at the next write.
* **Several processes.** Local workers, threads and ``torchrun`` ranks may share one folder:
  writers merge their entry into the current index under an exclusive ``flock`` on ``DIR/.lock``
  (on one machine, or a network file system whose locks work); readers need no lock. Two ranks
  that miss the same entry at once both compute it and one entry is kept. Without ``fcntl``
  (Windows) writes from several processes at once are not supported.
* **Bounded memory.** Only the index (a few hundred bytes per entry) is held; tensors are read
  from their shard on each hit with ``safetensors.safe_open`` (only the slice asked for).

``cache.stats`` counts hits, misses, writes and refusals of this instance (a copy sent to a worker
process counts on its own).

>>> import tempfile, torch, spectrakit as sk
>>> W = torch.randn(20, 10, dtype=torch.float64)
>>> with tempfile.TemporaryDirectory() as folder:
...     cache = sk.SpectrumCache(folder)
...     first = cache.svdvals(W, compute=lambda: torch.linalg.svdvals(W))
...     again = cache.svdvals(W, compute=lambda: torch.linalg.svdvals(W))
...     torch.equal(first, again), cache.stats.hits, cache.stats.misses
(True, 1, 1)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write
from .errors import SpectrakitError, SpectrakitWarning

try:  # POSIX: writers of several processes take turns
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "spectrakit-spectrum-cache"
FORMAT_VERSION = 2  # 2: SHA-256 fingerprints and shard hashes, `which` in the key
INDEX = "index.json"
_CHUNK = 1 << 22
_ENTRY_FIELDS = {"file": str, "bytes": int, "sha256": str, "method": str, "which": str}

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CacheWarning(SpectrakitWarning):
    """A cache file was refused (truncated, garbled, unlisted) and its value recomputed."""


@dataclass
class CacheStats:
    """What one :class:`SpectrumCache` instance did: entries served, computed, written, refused."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    refused: int = 0

    def __str__(self) -> str:
        return f"{self.hits} hits, {self.misses} misses, {self.writes} written, {self.refused} refused"


def stored_layout(W: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``W`` as its bytes lie in memory: ``(W, "C")``, or ``(W.mT, "T")`` for a transposed view
    (``W.mT`` contiguous, e.g. a transformers ``Conv1D`` weight seen ``out × in``).

    Args:
        W: the tensor.
    """
    tensor = W.detach()
    if not tensor.is_contiguous() and tensor.ndim == 2 and tensor.mT.is_contiguous():
        return tensor.mT, "T"
    return tensor, "C"


def content_fingerprint(W: torch.Tensor) -> str:
    """``"<hex>-C"`` or ``"<hex>-T"``: the SHA-256 of the dtype, shape and bytes of ``W`` as
    stored (:func:`stored_layout`), and its layout; equal for bitwise-equal tensors laid out
    alike. A transposed view is hashed as stored, without a copy; its ``-T`` keeps it apart
    from a contiguous tensor with the same bytes.

    The hex part is exactly :func:`spectrakit.adapt.base.fingerprint` of the stored tensor, the
    fingerprint an adapter keeps of its base weight, so ``adapt`` can key the cache with the
    hash it has just computed instead of hashing the weight twice. (SHA-256 rather than
    blake2b: with the CPU's SHA instructions it hashes about twice as fast, and a warm cache's
    time is mostly this hash.)

    Args:
        W: the tensor (any device; its bytes are hashed on the CPU).
    """
    tensor, layout = stored_layout(W)
    if tensor.is_meta:
        raise SpectrakitError(f"cache: a {tuple(W.shape)} meta tensor holds no data to fingerprint")
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    tensor = tensor.to("cpu").contiguous()
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return f"{digest.hexdigest()}-{layout}"


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> str:
    from . import __version__

    return f"spectrakit{__version__}/torch{torch.__version__}"


class SpectrumCache:
    """Singular values and top-``k`` factors of matrices, kept in a folder (see the module docstring).

    Args:
        path: the cache folder (created on the first write).
        verify: check each shard's SHA-256 hash before reading it (its size is always checked);
            off saves one read of the shard per hit.

    >>> import tempfile, torch, spectrakit as sk
    >>> W = torch.randn(30, 20, dtype=torch.float64)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     cache = sk.SpectrumCache(folder)
    ...     U, S, Vh = cache.svd(W, 8, compute=lambda: torch.linalg.svd(W, full_matrices=False)[:8])
    ...     U4, S4, Vh4 = cache.svd(W, 4, compute=lambda: None)   # served from the k = 8 entry
    ...     U4.shape, torch.equal(S4, S[:4]), cache.stats.hits
    (torch.Size([30, 4]), True, 1)
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise SpectrakitError(f"cache {self.path}: exists and is not a folder")
        self.verify = bool(verify)
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._signature: tuple[int, int, int] | None = None
        self._warned: set[str] = set()
        self._index_refused = False  # its shards are unlisted now: removed silently, not refused one by one

    # ----- pickling (a copy for a spawned worker opens the same folder) -----------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "verify": self.verify}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], verify=state["verify"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.path)!r}, {self.stats})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._index())

    # ----- what the verbs call ------------------------------------------------------------------
    def svdvals(self, W: torch.Tensor, *, compute: Callable[[], torch.Tensor],
                method: str = "svdvals", fingerprint: str | None = None) -> torch.Tensor:
        """The singular values of ``W``: from the cache, or ``compute()`` (then stored).

        Args:
            W: the matrix (its bytes, dtype, shape and device type make the key).
            compute: a zero-argument callable giving the values on a miss.
            method: what ``compute`` does, e.g. ``"svdvals:auto:None"`` (part of the key).
            fingerprint: ``content_fingerprint(W)`` when the caller already has it (see :meth:`tensors`).
        """
        return self.tensors(W, compute=lambda: {"S": compute()}, method=method, fingerprint=fingerprint)["S"]

    def svd(self, W: torch.Tensor, k: int, *, compute: Callable[[], Triplets], method: str = "svd",
            which: str = "top", fingerprint: str | None = None) -> Triplets:
        """``(U, S, Vh)`` of ``W``'s top (or bottom) ``k`` triplets: from an entry with ``k`` or more
        triplets, sliced to ``k``, or ``compute()`` (then stored).

        Args:
            W: the matrix (its bytes, dtype, shape and device type make the key).
            k: the number of triplets wanted.
            compute: a zero-argument callable giving ``(U, S, Vh)`` (``m×k``, ``k``, ``k×n``) on a miss.
            method: what ``compute`` does, e.g. ``"adapt-svd:krylov"`` (part of the key).
            which: ``"top"`` (an entry for ``k`` serves its leading ``k' ≤ k``) or ``"bottom"``
                (its trailing ``k'``).
            fingerprint: ``content_fingerprint(W)`` when the caller already has it (see :meth:`tensors`).
        """
        if which not in ("top", "bottom"):
            raise SpectrakitError(f"cache: which={which!r} must be 'top' or 'bottom'")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SpectrakitError(f"cache: k={k!r} must be an integer ≥ 1")

        def computed() -> dict[str, torch.Tensor]:
            U, S, Vh = compute()
            if not (U.ndim == 2 and S.ndim == 1 and Vh.ndim == 2 and U.shape[1] == S.numel() == Vh.shape[0]):
                raise SpectrakitError(f"cache: compute() for {method} gave U {tuple(U.shape)}, S {tuple(S.shape)}, "
                                      f"Vh {tuple(Vh.shape)}, which are not the factors of one SVD")
            return {"U": U, "S": S, "Vh": Vh}

        found = self.tensors(W, compute=computed, method=method, k=k, which=which, fingerprint=fingerprint)
        return found["U"], found["S"], found["Vh"]

    def tensors(self, W: torch.Tensor, *, compute: Callable[[], Mapping[str, torch.Tensor]], method: str,
                k: int | None = None, which: str = "all", fingerprint: str | None = None) -> dict[str, torch.Tensor]:
        """Any named tensors computed from ``W`` alone (e.g. ``compress``'s whole spectrum): from the
        cache, or ``compute()`` (then stored). The general form of :meth:`svdvals` and :meth:`svd`.

        Args:
            W: the matrix (its bytes, dtype, shape and device type make the key).
            compute: a zero-argument callable giving a name → tensor mapping on a miss.
            method: what ``compute`` does (part of the key).
            k: with ``which="top"``/``"bottom"``: the number of SVD triplets (``U``, ``S``, ``Vh``)
                wanted; ``None``: the entry is used whole.
            which: ``"all"``, or ``"top"``/``"bottom"`` for SVD triplets that may be sliced.
            fingerprint: :func:`content_fingerprint` of ``W`` as it is now, when the caller has
                just computed it over these very bytes (``adapt``: the adapter's base fingerprint);
                ``None``: computed here. A wrong one would serve another matrix's entry.
        """
        if which not in ("all", "top", "bottom"):
            raise SpectrakitError(f"cache: which={which!r} must be 'all', 'top' or 'bottom'")
        key = self._key(W, method, which, fingerprint)
        entry = self._lookup(key, k)
        found = None if entry is None else self._read(entry, k, which)
        if found is None and entry is not None and not entry.get("garbled"):
            with self._lock:
                self._signature = None  # read the index again: another process may have replaced the shard
            again = self._lookup(key, k)
            if again is not None and again.get("file") != entry.get("file"):
                entry, found = again, self._read(again, k, which)
        if entry is not None:
            if found is not None:
                with self._lock:
                    self.stats.hits += 1
                return {name: value.to(W.device) for name, value in found.items()}
        with self._lock:
            self.stats.misses += 1
        value = dict(compute())
        stored_k = int(value["S"].numel()) if which in ("top", "bottom") else None
        self._write(key, value, method=method, which=which, k=stored_k, refused=entry)
        return value

    # ----- keys and the index -------------------------------------------------------------------
    def _key(self, W: torch.Tensor, method: str, which: str, fingerprint: str | None = None) -> str:
        content = content_fingerprint(W) if fingerprint is None else fingerprint
        return (f"{content}/{str(W.dtype).replace('torch.', '')}/{W.device.type}/{method}/{which}/"
                f"{_versions()}")

    def _index(self) -> dict[str, dict[str, Any]]:
        """The index as on disk (read again only when the file changed)."""
        path = self.path / INDEX
        try:
            info = path.stat()
        except FileNotFoundError:
            self._entries, self._signature = {}, None
            return self._entries
        signature = (info.st_mtime_ns, info.st_size, info.st_ino)
        if signature != self._signature:
            self._entries, self._signature = self._load_index(path), signature
        return self._entries

    def _load_index(self, path: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            self._refuse(str(path), f"not a readable index ({type(error).__name__}); every entry is recomputed")
            self._index_refused = True
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SpectrakitError(f"cache {self.path}: {path.name} is not a spectrakit spectrum-cache index "
                                  "(another folder?)")
        entries = data.get("entries")
        if data.get("version") != FORMAT_VERSION or not isinstance(entries, dict):
            self._refuse(str(path), f"index version {data.get('version')!r} is not {FORMAT_VERSION}; "
                                    "every entry is recomputed")
            self._index_refused = True
            return {}
        return entries

    def _lookup(self, key: str, k: int | None) -> dict[str, Any] | None:
        with self._lock:
            entry = self._index().get(key)
        if entry is None:
            self._orphans(key)
            return None
        if not self._well_formed(entry):
            self._refuse(f"{self.path / INDEX} (entry {key.split('/')[0]}…)",
                         "garbled index entry; recomputing")
            return {"file": entry.get("file") if isinstance(entry, dict) else None, "garbled": True}
        if k is not None and (entry.get("k") is None or entry["k"] < k):
            return None  # too few triplets stored: recompute with more (this entry is then replaced)
        return entry

    @staticmethod
    def _well_formed(entry: Any) -> bool:
        if not isinstance(entry, dict):
            return False
        if any(not isinstance(entry.get(name), kind) for name, kind in _ENTRY_FIELDS.items()):
            return False
        k = entry.get("k")
        return (k is None or (isinstance(k, int) and k >= 1)) and isinstance(entry.get("layout", {}), dict) \
            and not Path(entry["file"]).is_absolute() and ".." not in Path(entry["file"]).parts

    def _shard_folder(self, key: str) -> tuple[Path, str]:
        stem = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return self.path / "shards" / stem[:2], stem

    def _orphans(self, key: str) -> None:
        """Shards of ``key`` on disk that the index does not list: left by a process killed
        between its rename and its index update. Refused (one line each) and removed."""
        folder, stem = self._shard_folder(key)
        if not folder.is_dir() or not any(folder.glob(f"{stem}-*.safetensors")):
            return
        with self._locked():  # a writer renames and lists under this lock: what is unlisted now stays so
            if key in self._index():
                return
            for shard in sorted(folder.glob(f"{stem}-*.safetensors")):
                if not self._index_refused:  # else the index's refusal was the one line
                    self._refuse(str(shard), "not listed in the index (written by a killed process?); recomputing")
                with contextlib.suppress(OSError):
                    shard.unlink()

    # ----- reading --------------------------------------------------------------------------------
    def _read(self, entry: dict[str, Any], k: int | None, which: str) -> dict[str, torch.Tensor] | None:
        if entry.get("garbled"):
            return None
        from safetensors import safe_open

        path = self.path / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # replaced by a larger k meanwhile (the caller looks again), or deleted
            if not self._replaced(entry):
                self._refuse(str(path), "listed in the index but missing; recomputing")
            return None
        if size != entry["bytes"]:
            self._refuse(str(path), f"{size} bytes where the index lists {entry['bytes']} "
                                    "(truncated or written by a killed process); recomputing")
            return None
        if self.verify and _file_hash(path) != entry["sha256"]:
            self._refuse(str(path), "its contents do not match the hash in the index (garbled); recomputing")
            return None
        layout = entry.get("layout", {})
        try:
            found = {}
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    if k is None or k == entry.get("k") or which not in ("top", "bottom"):
                        tensor = shard.get_tensor(name)
                        found[name] = tensor.mT if layout.get(name) == "T" else tensor
                    else:
                        found[name] = _read_slice(shard.get_slice(name), name, layout.get(name, ""), k,
                                                  entry["k"], which)
        except Exception as error:  # a shard safetensors cannot parse
            self._refuse(str(path), f"not a readable safetensors file ({type(error).__name__}); recomputing")
            return None
        return found

    def _replaced(self, entry: dict[str, Any]) -> bool:
        """Whether the index on disk now lists another file where ``entry`` was."""
        with self._lock:
            self._signature = None
            return entry["file"] not in {e.get("file") for e in self._index().values() if isinstance(e, dict)}

    # ----- writing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None:  # pragma: no cover - Windows
                yield
                return
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _write(self, key: str, value: dict[str, torch.Tensor], *, method: str, which: str, k: int | None,
               refused: dict[str, Any] | None) -> None:
        from safetensors.torch import save

        stored, layout = {}, {}
        for name, tensor in value.items():
            if not isinstance(tensor, torch.Tensor):
                raise SpectrakitError(f"cache: compute() for {method} gave {name}={type(tensor).__name__}, "
                                      "not a tensor")
            tensor = tensor.detach().to("cpu")
            if tensor.ndim == 2 and not tensor.is_contiguous() and tensor.mT.is_contiguous():
                tensor, layout[name] = tensor.mT, "T"  # kept as laid out: a hit gives the same strides
            stored[name] = tensor.contiguous()
        data = save(stored, metadata={"key": key})
        folder, stem = self._shard_folder(key)
        name = f"{stem}-k{k if k is not None else 'all'}-{secrets.token_hex(4)}.safetensors"
        entry = {"file": str((folder / name).relative_to(self.path)), "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "k": k, "method": method,
                 "which": which, "layout": layout}
        refused_file = refused.get("file") if refused else None
        with self._locked():
            entries = dict(self._index())
            current = entries.get(key)
            if (current is not None and self._well_formed(current) and current["file"] != refused_file
                    and (k is None or (current.get("k") or 0) >= k) and (self.path / current["file"]).is_file()):
                return  # another process stored as much meanwhile: keep its entry
            with atomic_write(folder / name, "wb", encoding=None) as handle:
                handle.write(data)
            entries[key] = entry
            if self._index_refused:  # the refused index's shards: nothing lists them any more
                self._sweep({e.get("file") for e in entries.values() if isinstance(e, dict)})
            with atomic_write(self.path / INDEX) as handle:
                json.dump({"format": FORMAT, "version": FORMAT_VERSION, "entries": entries}, handle, indent=0)
            info = (self.path / INDEX).stat()  # ours: no one else writes while we hold the lock
            self._entries, self._signature = entries, (info.st_mtime_ns, info.st_size, info.st_ino)
            self.stats.writes += 1
            old = current.get("file") if isinstance(current, dict) else None
            if isinstance(old, str) and old != entry["file"] and self._well_formed(current):
                with contextlib.suppress(OSError):  # the smaller or refused entry it replaces
                    (self.path / old).unlink()

    def _sweep(self, listed: set[Any]) -> None:
        """Remove every shard that ``listed`` (the new index's files) does not name (under the lock)."""
        for shard in (self.path / "shards").glob("*/*.safetensors"):
            if str(shard.relative_to(self.path)) not in listed:
                with contextlib.suppress(OSError):
                    shard.unlink()
        self._index_refused = False

    def _refuse(self, what: str, why: str) -> None:
        with self._lock:
            self.stats.refused += 1
            message = f"spectrum cache: {what}: {why}"
            if message in self._warned:
                return
            self._warned.add(message)
        warnings.warn(message, CacheWarning, stacklevel=4)


def _read_slice(handle: Any, name: str, layout: str, k: int, stored_k: int, which: str) -> torch.Tensor:
    """The ``k`` triplets asked for of one stored tensor (``U``: columns, ``S``/``Vh``: rows),
    read from its shard alone."""
    cut = slice(0, k) if which == "top" else slice(stored_k - k, stored_k)
    axis = {"U": 1, "S": 0, "Vh": 0}[name]
    if layout == "T":
        axis = 1 - axis
    tensor = (handle[cut] if axis == 0 else handle[:, cut]).contiguous()  # a column slice is a strided view
    return tensor.mT if layout == "T" else tensor


def add_cache_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--cache DIR`` on a command-line parser.

    Args:
        parser: the sub-command's parser.
        what: what the command keeps there, for the help text.
    """
    parser.add_argument("--cache", metavar="DIR",
                        help=f"spectrum cache folder: {what} are read from it when this very weight was "
                             "decomposed before (same bytes, dtype and method), else computed and written there")


def report_cache(cache: SpectrumCache | None, quiet: bool = False) -> None:
    """One ``spectrum cache DIR: … hits, … misses …`` line on stderr (the CLI's closing line).

    Args:
        cache: the command's cache (``None``: nothing is printed).
        quiet: print nothing.
    """
    if cache is not None and not quiet:
        print(f"spectrum cache {cache.path}: {cache.stats}", file=sys.stderr)


def as_cache(cache: SpectrumCache | str | os.PathLike[str] | None) -> SpectrumCache | None:
    """``cache`` as a :class:`SpectrumCache`: a folder path opens one, ``None`` stays ``None``.

    Args:
        cache: a :class:`SpectrumCache`, a folder path, or ``None`` (no cache).
    """
    if cache is None or isinstance(cache, SpectrumCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return SpectrumCache(cache)
    raise SpectrakitError(f"cache={cache!r}: expected a folder path or a spectrakit.SpectrumCache")


_ACTIVE: ContextVar[SpectrumCache | None] = ContextVar("spectrakit_spectrum_cache", default=None)


@contextlib.contextmanager
def use_cache(cache: SpectrumCache | str | os.PathLike[str] | None) -> Iterator[SpectrumCache | None]:
    """Make ``cache`` the one :func:`active_cache` returns inside the block (this thread and
    context only): how ``adapt`` and ``compress`` reach the SVDs deep in their methods without
    a ``cache`` argument on every layer (and without saving it in an adapter's config).

    Args:
        cache: as for :func:`as_cache`; ``None`` turns caching off inside the block.
    """
    token = _ACTIVE.set(as_cache(cache))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active_cache() -> SpectrumCache | None:
    """The cache set by the innermost :func:`use_cache` block, or ``None``."""
    return _ACTIVE.get()
