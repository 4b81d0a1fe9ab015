#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install spectrakit into it.
#   scripts/bootstrap.sh [EXTRAS]      e.g. scripts/bootstrap.sh dev
# A CUDA torch the system Python already imports is reused: torch and its CUDA runtime
# (nvidia-*, triton) are linked into the venv by scripts/link_system_torch.py, and nothing
# else of the system's packages is visible there, so numpy and the rest are installed
# into the venv (a --system-site-packages venv saw the system's numpy and failed for a
# non-root user). Otherwise the pinned CPU-friendly torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPECTRAKIT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" scripts/link_system_torch.py "$SITE" \
        || echo "bootstrap: could not link the system torch; installing one" >&2
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==2.13.0"
fi
if [ -n "$EXTRAS" ]; then
    "${PIP[@]}" install -e ".[$EXTRAS]"
else
    "${PIP[@]}" install -e .
fi
# The report tests render the HTML report in a real headless Chromium (they skip without
# one). Best effort, dev only, as root with apt: a failure here never fails the bootstrap.
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } \
        || echo "bootstrap: could not install chromium; the report's browser test will skip" >&2
fi
