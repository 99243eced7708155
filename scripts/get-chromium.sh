#!/usr/bin/env bash
# Headless Chromium for the report test (renders elbox report's HTML): Debian package chromium.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then
  exit 0
fi
echo "get-chromium: installing the Debian package chromium" >&2
as_root apt-get update -qq && as_root apt-get install -y -qq chromium
