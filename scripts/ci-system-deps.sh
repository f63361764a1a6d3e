#!/usr/bin/env bash
# System packages CI needs beyond Python: Debian's `chromium` for the real-browser test of the HTML
# leaderboard (tests/harness/test_html_browser.py skips without it) and the leaderboard screenshot.
# Idempotent; never fails CI: without root, apt or network it warns and the browser test skips.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ci-system-deps: warning: not root and no sudo; chromium not installed (browser test will skip)" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-system-deps: warning: no apt-get; install Chromium yourself (browser test will skip)" >&2
  exit 0
fi
echo "ci-system-deps: installing chromium (apt-get)" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } >/tmp/ci-system-deps.log 2>&1; then
  echo "ci-system-deps: warning: apt-get install chromium failed (see /tmp/ci-system-deps.log); browser test will skip" >&2
fi
exit 0
