"""The version, the changelog and the package data that a wheel must carry."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spectrakit as sk

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_one_source():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", sk.__version__)
    assert importlib.metadata.version("spectrakit") == sk.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"] and "version" not in project


def test_cli_version():
    done = subprocess.run([sys.executable, "-m", "spectrakit.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.strip() == f"spectrakit {sk.__version__}"


def test_changelog_names_the_version_and_every_verb():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{sk.__version__}]" in text
    for verb in ("Analyze", "Regularize", "Adapt", "Compress"):
        assert re.search(rf"^### .*{verb}", text, flags=re.M), verb


def test_package_data_covers_the_files_the_code_opens():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["spectrakit"]
    package = ROOT / "src" / "spectrakit"
    data_files = [p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                  and "__pycache__" not in p.parts]
    uncovered = [p.relative_to(package).as_posix() for p in data_files
                 if not any(p.relative_to(package).match(pattern) for pattern in patterns)]
    assert not uncovered, f"files the wheel would leave out: {uncovered}"
