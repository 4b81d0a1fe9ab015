"""A progress bar that uses tqdm when it is installed and a plain stderr line otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "matrix") -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr (silent when ``enabled`` is False)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from _plain(items, total, desc)
        return
    yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def _plain(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    interactive = sys.stderr.isatty()
    count = 0
    for count, item in enumerate(items, 1):
        if interactive:
            of = f"/{total}" if total else ""
            sys.stderr.write(f"\r{desc} {count}{of}")
            sys.stderr.flush()
        yield item
    if interactive:
        sys.stderr.write("\r" + " " * (len(desc) + 24) + "\r")
        sys.stderr.flush()
