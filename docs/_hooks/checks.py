"""MkDocs hooks of the spectrakit site: the checks that make ``make docs`` fail, and the tutorials.

* before the build: every public name must be documented with its parameters
  (:mod:`public_api`), and every tutorial script runs, writing its figures and printed
  output under ``docs/tutorials/_output/<name>/`` for its page to show;
* the nav gets one page per ``docs/benchmarks/*.md`` (in ``scripts/build_benchmarks.py``'s
  order), an API page for each documented module that exists, and every guide or tutorial
  page that ``mkdocs.yml`` does not list, so a new benchmark, guide or verb needs no edit
  here;
* after the build: the API page and a tutorial page are rendered in headless Chromium,
  and the build fails unless the screenshots and the rendered text show real content.

A tutorial whose ``_output/<name>/`` was written by the test suite from exactly the current
code (same fingerprint of the script and the package) is not run again.
``SPECTRAKIT_DOCS_TUTORIALS=0`` skips running the tutorials (their last outputs are used).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _load(path: Path) -> Any:
    # MkDocs restores sys.path after loading a hook, so the helpers load by path.
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


public_api = _load(HERE / "public_api.py")
build_benchmarks = _load(ROOT / "scripts" / "build_benchmarks.py")
tutorial_output = _load(ROOT / "docs" / "tutorials" / "tutorial_output.py")

TUTORIALS = ROOT / "docs" / "tutorials"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Rendered pages and text each must show; the tutorial's figure must have loaded.
RENDER_CHECKS = {
    "api/linalg/index.html": ("spectrakit.linalg.svd", "Parameters", "Returns"),
    "tutorials/analyze/index.html": ("Analyze the reference model", "sk.analyze", "self_attn.o_proj.weight"),
}


def on_config(config: Any) -> Any:
    nav = config["nav"]
    ORDER = build_benchmarks.ORDER
    benchmarks = sorted((ROOT / "docs" / "benchmarks").glob("*.md"),
                        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    api_pages = {f"api/{name.rpartition('.')[2]}.md" for name in public_api.documented_modules()}
    listed = set(_nav_pages(nav))
    docs = ROOT / "docs"
    unlisted = {"Guides": sorted(p for p in docs.glob("*.md") if p.name not in listed),
                "Tutorials": sorted(p for p in (docs / "tutorials").glob("*.md")
                                    if f"tutorials/{p.name}" not in listed)}
    for section in nav:
        for title, pages in unlisted.items():
            if title in section:
                section[title] += [{_title(p): p.relative_to(docs).as_posix()} for p in pages]
        if "Benchmarks" in section:
            section["Benchmarks"] = [{_title(p): f"benchmarks/{p.name}"} for p in benchmarks]
        if "API reference" in section:
            listed = {next(iter(entry.values())) for entry in section["API reference"]}
            for page in sorted(api_pages - listed - {"api/spectrakit.md"}):
                section["API reference"].append({f"spectrakit.{Path(page).stem}": page})
    return config


def on_files(files: Any, config: Any) -> Any:
    # A documented module without a hand-written page gets a generated one.
    from mkdocs.structure.files import File

    for name in public_api.documented_modules():
        page = f"api/{name.rpartition('.')[2]}.md"
        if files.get_file_from_path(page) is None:
            content = f"# {name}\n\n::: {name}\n    options:\n      show_root_heading: false\n"
            files.append(File.generated(config, page, content=content))
    return files


def _nav_pages(entry: Any) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in _nav_pages(value)]
    if isinstance(entry, list):
        return [page for value in entry for page in _nav_pages(value)]
    return []


def _title(page: Path) -> str:
    match = re.search(r"^#\s+(.+)$", page.read_text(), flags=re.M)
    title = match.group(1) if match else page.stem
    return title.split(":")[0].strip()


def on_pre_build(config: Any) -> None:
    problems = public_api.all_problems()
    if problems:
        raise PluginError("public names without a documented docstring:\n  " + "\n  ".join(problems))
    if os.environ.get("SPECTRAKIT_DOCS_TUTORIALS", "1") != "0":
        for script in sorted(TUTORIALS.glob("*.py")):
            if script.stem != "tutorial_output":
                _run_tutorial(script)


def _run_tutorial(script: Path) -> None:
    if tutorial_output.is_current(script):  # the test suite ran this very code already
        print(f"docs: tutorial {script.name}: reusing the outputs of the same code", file=sys.stderr)
        return
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as produced:
        done = subprocess.run([sys.executable, str(script), produced], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-12:])
            raise PluginError(f"tutorial {script.name} failed (exit {done.returncode}):\n{tail}")
        tutorial_output.publish(script, Path(produced), done.stdout)


def on_post_build(config: Any) -> None:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        if os.environ.get("SPECTRAKIT_DOCS_REQUIRE_BROWSER") == "1":
            raise PluginError("no Chromium on PATH for the rendering check (apt-get install chromium)")
        print("docs: no Chromium on PATH, rendering check skipped", file=sys.stderr)
        return
    site = Path(config["site_dir"])
    for page, expected in RENDER_CHECKS.items():
        check_rendered(browser, site / page, expected, site / "_screenshots" / (page.replace("/", "_") + ".png"))


def _chromium(browser: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def check_rendered(browser: str, page: Path, expected: tuple[str, ...], png: Path) -> None:
    """Render ``page`` in headless Chromium; fail unless its text holds ``expected`` and the
    screenshot is a page of content (many colours, a good share of non-background pixels)."""
    if not page.exists():
        raise PluginError(f"rendering check: {page} was not built")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = _chromium(browser, profile, "--dump-dom", page.as_uri())
        _chromium(browser, profile, "--window-size=1280,1600", f"--screenshot={png}", page.as_uri())
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    missing = [want for want in expected if want not in text]
    if missing:
        raise PluginError(f"rendering check: {page.name} rendered without {missing}")
    if not png.exists():
        raise PluginError(f"rendering check: Chromium wrote no screenshot of {page}")
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L").resize((320, 400))).astype(int).ravel()
    background = np.bincount(pixels).argmax()
    inked = float((np.abs(pixels - background) > 40).mean())
    if inked < 0.02 or len(np.unique(pixels)) < 16:
        raise PluginError(f"rendering check: the screenshot of {page} looks blank ({inked:.1%} inked)")
