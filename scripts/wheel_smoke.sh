#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment with nothing else from
# this checkout, and run `spectrakit analyze` on the bundled model from outside the
# checkout. Catches a module or data file missing from the package.
#   bash scripts/wheel_smoke.sh            (uses .venv's python to build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON="${PYTHON:-python3}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$ROOT/.venv/bin/python" -m pip wheel --no-deps --no-build-isolation -q -w "$WORK/dist" "$ROOT" 2>&1 \
    | grep -v "is ignored" || true
WHEEL=$(ls "$WORK"/dist/spectrakit-*.whl)
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
# The same pinned torch as the set-up; the wheel's own dependencies come from its metadata.
"${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" install "$WHEEL" 2>&1 | grep -v "is ignored" || true
cd "$WORK"
"$WORK/venv/bin/spectrakit" --version
"$WORK/venv/bin/spectrakit" analyze --out "$WORK/report" --quiet
for file in spectra.csv spectra.json report.html; do
    [ -s "$WORK/report/$file" ] || { echo "wheel smoke test: $file was not written" >&2; exit 1; }
done
rows=$(($(wc -l < "$WORK/report/spectra.csv") - 1))
[ "$rows" -ge 28 ] || { echo "wheel smoke test: only $rows rows in spectra.csv" >&2; exit 1; }
echo "wheel smoke test: $(basename "$WHEEL") installed alone; spectrakit analyze wrote $rows rows"
