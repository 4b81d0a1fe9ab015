"""Handing freed heap memory back to the operating system between streamed tensors.

glibc's ``malloc`` serves a request from its heap unless it is above the mmap threshold,
and it raises that threshold (up to 32 MiB) each time a larger mapped block is freed. A
loop that loads a tensor, computes with it and frees it therefore ends up placing most
of its tensors on the heap, where tensors of different sizes leave holes the next ones
do not fit: the resident set grows with the number of tensors streamed (on a 1 GB
checkpoint of 135 matrices, ``analyze`` reached 0.97 GB where one block is 51 MB), not
with the largest one. ``malloc_trim(0)`` returns every free page of the heap, so a
streamed loop that calls it after each tensor stays near one tensor's working set::

    peak RSS ≈ baseline + max over tensors (working set),  not  + Σ fragments

It costs about 10 ms per call on a heap of a few hundred MB, and does nothing (returns
``False``) where the C library has no ``malloc_trim`` (musl, macOS, Windows).

>>> release_freed_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has no such symbol
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (``malloc_trim(0)``); ``False`` where unsupported.

    Call it after a streamed tensor and its intermediates are freed, so that the next one
    does not grow the heap around the holes they left.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
