"""scripts/bootstrap.sh reuses a system CUDA torch without exposing the system's other packages."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _link_module():
    spec = importlib.util.spec_from_file_location("link_system_torch", ROOT / "scripts" / "link_system_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distribution(site: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()):
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    record = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD", "../../../bin/torchrun"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in record))


@pytest.fixture
def system_site(tmp_path: Path) -> Path:
    """A fake system site-packages: a CUDA torch, its CUDA runtime, and numpy/filelock beside it."""
    site = tmp_path / "system-site"
    _distribution(site, "torch", "2.13.0", {"torch/__init__.py": "version = 'cuda'\n", "torchgen/__init__.py": ""},
                  ("filelock", "nvidia-cublas-cu12==12.8; platform_system == 'Linux'", "triton==3.5",
                   "opt-einsum>=3.3; extra == 'opt-einsum'"))
    _distribution(site, "nvidia-cublas-cu12", "12.8", {"nvidia/cublas/lib/libcublas.so": ""})
    _distribution(site, "triton", "3.5", {"triton/__init__.py": ""}, ("setuptools",))
    _distribution(site, "filelock", "3.0", {"filelock/__init__.py": ""})
    _distribution(site, "numpy", "1.21.5", {"numpy/__init__.py": "raise ImportError('the system numpy')\n"})
    _distribution(site, "setuptools", "59.0", {"setuptools/__init__.py": ""})
    return site


def test_only_torch_and_its_cuda_runtime_are_linked(system_site: Path, tmp_path: Path):
    target = tmp_path / "venv-site"
    target.mkdir()
    linked = _link_module().link_runtime(system_site, target)
    assert linked == ["nvidia", "nvidia_cublas_cu12-12.8.dist-info", "torch", "torch-2.13.0.dist-info",
                      "torchgen", "triton", "triton-3.5.dist-info"]
    assert all((target / name).is_symlink() for name in linked)
    assert not (target / "numpy").exists() and not (target / "filelock").exists()
    assert _link_module().link_runtime(system_site, target) == []  # a second run changes nothing


def test_a_fresh_venv_sees_the_linked_torch_and_not_the_system_numpy(system_site: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _link_module().link_runtime(system_site, Path(site))
    probe = ("import importlib.util as u, importlib.metadata as m, torch; "
             "print(torch.version, m.version('torch'), u.find_spec('numpy') is None)")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["cuda", "2.13.0", "True"]  # pip in this venv would install its own numpy


def test_a_cpu_torch_is_not_linked(tmp_path: Path):
    # this interpreter's torch is a CPU build: bootstrap.sh installs the pinned one instead
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this interpreter has a CUDA torch")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "link_system_torch.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and list(tmp_path.iterdir()) == []


def test_bootstrap_script_no_longer_uses_system_site_packages():
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "bootstrap.sh")]).returncode == 0
    assert not re.search(r"-m venv .*--system-site-packages", script) and '-m venv "$VENV"' in script
    assert "link_system_torch.py" in script
