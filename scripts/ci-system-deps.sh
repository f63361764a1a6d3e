#!/usr/bin/env bash
# System packages CI needs beyond Python: Debian's `chromium` for the real-browser test of the HTML
# leaderboard (tests/harness/test_html_browser.py skips without it) and the leaderboard screenshot, and
# `g++` + `ninja-build` for the fused CPU KV decode kernel (kernels/kv_decode_cpu.cpp, built by
# torch.utils.cpp_extension on first use; without them the torch path runs and its tests say so).
# Idempotent; never fails CI: without root, apt or network it warns and the dependent tests skip or fall back.
set -uo pipefail
want=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || want+=(chromium)
command -v g++ >/dev/null 2>&1 || want+=(g++)
command -v ninja >/dev/null 2>&1 || want+=(ninja-build)
if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ci-system-deps: warning: not root and no sudo; not installed: ${want[*]}" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-system-deps: warning: no apt-get; install yourself: ${want[*]}" >&2
  exit 0
fi
echo "ci-system-deps: installing ${want[*]} (apt-get)" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}"; } >/tmp/ci-system-deps.log 2>&1; then
  echo "ci-system-deps: warning: apt-get install ${want[*]} failed (see /tmp/ci-system-deps.log)" >&2
fi
exit 0
