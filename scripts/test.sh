#!/usr/bin/env bash
# Set up the environment and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/get-data.sh  # one test reads the real Fashion-MNIST files
scripts/get-chromium.sh  # the report test renders HTML in headless Chromium
.venv/bin/ruff check --quiet .  # lint (pyproject.toml [tool.ruff])
.venv/bin/ruff format --check --quiet .  # formatted at 120 columns
exec .venv/bin/python -m pytest -q "$@"
