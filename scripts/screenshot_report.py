"""Analyze the bundled reference model, write its HTML report and screenshot it.

    .venv/bin/python scripts/screenshot_report.py [--html spectrakit-report/report.html]
                                                   [--png docs/img/report.png] [--size 1400,2800]

Needs a Chromium on PATH (Debian: ``apt-get install chromium``). The PNG goes to
``docs/img/report.png`` (used by docs/report.md); it is quantized to 256 colours when
Pillow is installed, to keep the repository small.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import spectrakit as sk
from spectrakit._atomic import atomic_save_path
from spectrakit.analyze.report import write_html_report

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def screenshot(html: Path, png: Path, size: str) -> None:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile, atomic_save_path(png) as tmp:
        shot = Path(profile) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                        f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=5000",
                        f"--screenshot={shot}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        try:
            from PIL import Image
        except ImportError:
            shutil.copyfile(shot, tmp)
        else:
            Image.open(shot).convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=None, help="keep the report here (default: a temp dir)")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "report.png")
    parser.add_argument("--size", default="1400,2800", help="browser window WIDTH,HEIGHT (default 1400,2800)")
    args = parser.parse_args()

    start = time.perf_counter()
    table = sk.analyze(sk.reference.reference_weights_path(), progress=False)
    analyzed = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or Path(tmp) / "report.html"
        write_html_report(table, html, title="spectrakit report — reference model")
        written = time.perf_counter()
        screenshot(html, args.png, args.size)
    print(f"analyzed {len(table)} matrices in {analyzed - start:.1f} s, report in {written - analyzed:.2f} s, "
          f"screenshot {args.png} ({args.png.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
