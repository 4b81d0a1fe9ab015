"""Reuse the system Python's CUDA torch in a fresh virtual environment, and nothing else of it.

    python3 scripts/link_system_torch.py VENV_SITE_PACKAGES

Run by ``scripts/bootstrap.sh`` with the system interpreter. When that interpreter imports a
CUDA build of torch, torch and the CUDA runtime distributions it requires (``nvidia-*``,
``triton``, ``cuda-*``, gigabytes of wheels) are symlinked into the venv's site-packages, so
they need not be downloaded again. Everything else — numpy above all — is installed into the
venv by pip as usual: a venv made with ``--system-site-packages`` instead saw the system's
numpy (or a user site's, or one pip cannot uninstall) and failed for a non-root user.

Prints what it linked; exits 0 without linking when there is no CUDA torch to reuse.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

# the distributions of a CUDA torch worth reusing: torch itself and its CUDA runtime
_RUNTIME = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*|cuda-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])


def runtime_distributions(site: Path) -> list[metadata.Distribution]:
    """torch and, transitively, the CUDA runtime distributions it requires, installed in ``site``.

    Args:
        site: the site-packages folder that holds torch.
    """
    installed = {_canonical(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    todo, found = ["torch"], {}
    while todo:
        name = todo.pop()
        if name in found or name not in installed or not _RUNTIME.match(name):
            continue
        found[name] = installed[name]
        todo += [_requirement_name(r) for r in installed[name].requires or [] if "extra ==" not in r]
    return list(found.values())


def link_runtime(site: Path, target: Path) -> list[str]:
    """Symlink the top-level entries (packages, ``.dist-info``) of :func:`runtime_distributions`
    from ``site`` into ``target``; returns their names. Entries already in ``target`` stay.

    Args:
        site: the system site-packages folder that holds torch.
        target: the venv's site-packages folder.
    """
    tops: set[str] = set()
    for distribution in runtime_distributions(site):
        for file in distribution.files or []:
            parts = Path(str(file)).parts
            if parts and parts[0] != ".." and not parts[0].endswith(".pth"):
                tops.add(parts[0])
    linked = []
    for name in sorted(tops):
        source, link = site / name, target / name
        if source.exists() and not link.exists() and not link.is_symlink():
            link.symlink_to(source)
            linked.append(name)
    return linked


def main(argv: list[str]) -> int:
    """Link this interpreter's CUDA torch into the site-packages folder ``argv[1]``."""
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        return 0
    if getattr(torch.version, "cuda", None) is None:
        return 0  # a CPU torch is cheap to install; bootstrap.sh pins one
    site = Path(torch.__file__).resolve().parent.parent
    linked = link_runtime(site, Path(argv[1]))
    if linked:
        print(f"bootstrap: reusing the system CUDA torch {torch.__version__} from {site} "
              f"({len(linked)} entries linked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
