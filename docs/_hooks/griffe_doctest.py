"""A griffe extension: the bare doctests of spectrakit's docstrings rendered as code.

spectrakit's docstrings end with runnable ``>>>`` examples (the test suite runs them as
doctests), written without a Markdown fence. Unfenced, Markdown would reflow them into a
paragraph and read ``[...]`` in their output as links; this wraps each run of prompt,
continuation and output lines in a ``pycon`` fence before the docstring is parsed.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap every block of ``>>>`` lines (and the output lines after them) in a pycon fence."""
    out: list[str] = []
    in_block = False
    indent = ""
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        if not fenced and not in_block and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            in_block = True
        elif in_block and not stripped:
            out.append(f"{indent}```")
            in_block = False
        out.append(line)
    if in_block:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctests of every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
