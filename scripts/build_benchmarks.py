#!/usr/bin/env python
"""Assemble BENCHMARKS.md from the per-benchmark write-ups in docs/benchmarks/.

Each ``docs/benchmarks/<name>.md`` holds one benchmark's figures, machine and
reproduce command (written from that benchmark's run); this script puts them in one
file, in the order below, behind a short index. Run it after updating any of them:

    python scripts/build_benchmarks.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from spectrakit._atomic import atomic_write  # noqa: E402

ORDER = ("summary", "spectra", "intruders", "monitor", "adapt", "compress", "regularize", "continual")

HEADER = """# Benchmarks

Every figure below comes from a script in `bench/`, run on the machine it names, with
the command given next to it. Each script times spectrakit and its anchor (torch,
weightwatcher, PEFT) side by side in one run and reports the ratio. Where we are
behind, the section says so. This file is assembled from `docs/benchmarks/*.md` by
`python scripts/build_benchmarks.py`.

"""


def main() -> None:
    folder = ROOT / "docs" / "benchmarks"
    pages = {path.stem: path for path in folder.glob("*.md")}
    names = [n for n in ORDER if n in pages] + sorted(n for n in pages if n not in ORDER)
    parts, index = [], []
    for name in names:
        text = pages[name].read_text().strip()
        title = re.match(r"#\s+(.*)", text)
        heading = title.group(1) if title else name
        body = text[title.end():].strip() if title else text
        body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)  # one level down
        body = body.replace("](../img/", "](docs/img/").replace("](../../docs/img/", "](docs/img/")
        anchor = re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        index.append(f"- [{heading}](#{anchor})")
        parts.append(f"## {heading}\n\n{body}\n")
    with atomic_write(ROOT / "BENCHMARKS.md") as handle:
        handle.write(HEADER + "\n".join(index) + "\n\n" + "\n".join(parts))


if __name__ == "__main__":
    main()
