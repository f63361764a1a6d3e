#!/usr/bin/env bash
# ruff (lint) over the tree and mypy over the whole `quantbench` package. Needs .venv (scripts/setup.sh).
# mypy reads a package: build/typecheck/quantbench is the installed package's files as symlinks (the
# root's __init__.py and the three code folders), without tests/, scripts/ and build/ itself.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
root=build/typecheck
mkdir -p "$root/quantbench"
ln -sfn "$PWD/__init__.py" "$root/quantbench/__init__.py"
for d in kernels methods harness; do ln -sfn "$PWD/$d" "$root/quantbench/$d"; done
MYPYPATH="$root" .venv/bin/mypy -p quantbench --cache-dir build/mypy-cache
