"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _new_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0o666 minus the umask
    (``mkstemp`` creates 0o600, too private for reports meant to be shared)."""
    umask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:  # Linux: read it without changing it
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), None)
    if umask is None:  # elsewhere: set and restore (briefly process-wide)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    A crash or Ctrl-C inside the block leaves ``path`` as it was (absent or old),
    never half-written.

    >>> with atomic_write("table.csv") as f:  # doctest: +SKIP
    ...     f.write("name,sigma_max\\n")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_write`, but yields a temporary *path* for libraries that
    insist on opening the file themselves (e.g. ``safetensors.torch.save_file``)."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Make sure files can be written into the folder ``path`` *before* any work starts.

    The folder (and missing parents) is created, a probe file written and deleted in it, and
    the folders this check created are removed again, so a failed command leaves nothing
    behind. Catches a read-only folder or file system, a path through a regular file and an
    existing file where the folder should be. Raises :class:`~spectrakit.errors.SpectrakitError`
    naming ``option`` and the path.

    Args:
        path: the output folder.
        option: the option name used in the message (``--out``).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = check_writable_folder(pathlib.Path(tmp) / "a" / "b")
    ...     folder.exists()   # checked, and left as it was
    False
    """
    from .errors import SpectrakitError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SpectrakitError(f"{option} {folder}: exists and is not a folder")
    missing = []
    ancestor = folder
    while not ancestor.exists():
        missing.append(ancestor)
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise SpectrakitError(f"{option} {folder}: {ancestor} is a file, not a folder")
    try:
        for attempt in range(3):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd, probe = tempfile.mkstemp(prefix=".spectrakit-write-check.", dir=folder)
                break
            except FileNotFoundError:  # another process (a torchrun rank) checking the same --out removed
                if attempt == 2:       # the folder it had created between our mkdir and our probe
                    raise
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise SpectrakitError(f"{option} {folder}: cannot write there ({error.strerror or error})") from None
    finally:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
    return folder
