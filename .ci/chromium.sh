#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the browser test (tests/test_browser.py): installed from apt
# when missing; nothing is downloaded by the test itself. Needs root or sudo. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "chromium.sh: $(chromium --version 2>/dev/null), $(chromedriver --version)" >&2
  exit 0
fi
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
echo "chromium.sh: installing chromium and chromium-driver from Debian apt" >&2
"${SUDO[@]}" apt-get update -qq >&2
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
chromedriver --version >&2
