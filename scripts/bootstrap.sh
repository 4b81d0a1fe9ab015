#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install spectrakit into it.
#   scripts/bootstrap.sh [EXTRAS]      e.g. scripts/bootstrap.sh dev
# A torch that is already importable (for instance a CUDA build in the system
# site-packages) is kept; otherwise the pinned CPU-friendly torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPECTRAKIT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
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
