#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch 2.13.0 and elbox installed (idempotent, quick when done before).
# Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where plain pip would fetch a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    echo "setup: installing python3-venv" >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
    rm -rf .venv && "$PYTHON" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
