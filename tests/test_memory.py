"""spectrakit._memory: freed heap pages go back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from spectrakit._memory import _malloc_trim

# In a fresh interpreter (malloc settings are process-wide): fixed thresholds so that the
# 1 MiB tensors come from the heap and free() does not trim by itself, then every other
# tensor freed — 200 holes between live tensors, which only malloc_trim can hand back.
HOLES = textwrap.dedent("""
    import ctypes, torch
    from spectrakit._memory import release_freed_memory
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    def anonymous():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("RssAnon:"))
    blocks = [torch.ones(1 << 18) for _ in range(400)]
    kept = blocks[1::2]
    del blocks
    before = anonymous()
    assert release_freed_memory() is True
    print(before - anonymous(), float(sum(t.sum() for t in kept)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs glibc")
def test_freed_heap_holes_are_returned():
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True).stdout.split()
    released, kept_sum = int(out[0]), float(out[1])
    assert released > 150e6, f"only {released / 1e6:.0f} MB of the 210 MB freed were returned"
    assert kept_sum == 200 * (1 << 18)  # the live tensors are untouched


def test_no_trim_where_unsupported(monkeypatch):
    import spectrakit._memory as memory

    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False
