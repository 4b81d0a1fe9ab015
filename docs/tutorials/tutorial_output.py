"""Shared by the tutorial scripts: where they write, and matplotlib without a screen."""

from __future__ import annotations

import sys
from pathlib import Path


def output_dir(default: str) -> Path:
    """The folder a tutorial writes its figures to: ``argv[1]``, else ``default`` beside the scripts."""
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "_output" / default
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported lazily
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
