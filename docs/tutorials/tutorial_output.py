"""Shared by the tutorial scripts, the docs build and the tests: where a tutorial writes,
matplotlib without a screen, and a fingerprint that lets the docs build reuse outputs the
test suite has just produced from the same code."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE.parent.parent / "src" / "spectrakit"


def output_dir(default: str) -> Path:
    """The folder a tutorial writes its figures to: ``argv[1]``, else ``default`` beside the scripts.

    Args:
        default: the tutorial's name, used when no folder is given on the command line.
    """
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "_output" / default
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported lazily
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fingerprint(script: Path) -> str:
    """SHA-256 of a tutorial script, this file and every file of the spectrakit package.

    Args:
        script: the tutorial's ``.py`` file.
    """
    digest = hashlib.sha256()
    files = [script, Path(__file__)] + sorted(p for p in SOURCES.rglob("*") if p.is_file()
                                             and "__pycache__" not in p.parts)
    for path in files:
        digest.update(path.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def publish(script: Path, produced: Path, printed: str) -> Path:
    """Move a finished run's files into ``_output/<name>/`` with what it printed and its fingerprint.

    Args:
        script: the tutorial's ``.py`` file.
        produced: the folder the run wrote its figures to.
        printed: the run's standard output, shown on the tutorial's page.
    """
    target = HERE / "_output" / script.stem
    staging = target.with_name(f".{script.stem}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(produced, staging)
    staging.chmod(0o755)  # a pytest tmp_path is private to its owner
    (staging / "output.txt").write_text(printed)
    (staging / ".fingerprint").write_text(fingerprint(script))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def is_current(script: Path) -> bool:
    """Whether ``_output/<name>/`` holds a complete run of exactly the current code.

    Args:
        script: the tutorial's ``.py`` file.
    """
    stamp = HERE / "_output" / script.stem / ".fingerprint"
    return stamp.is_file() and stamp.read_text() == fingerprint(script)
