#!/usr/bin/env bash
# Make sure Fashion-MNIST is available: found on disk, else the Debian package, else elbox downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if .venv/bin/python -c "from elbox.data import find_dataset_dir; find_dataset_dir('fashion-mnist', download=False)" 2>/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null; then
  echo "get-data: installing the Debian package dataset-fashion-mnist" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist || echo "get-data: apt failed; elbox will try to download" >&2
fi
