#!/usr/bin/env bash
# ruff (lint) over the tree and mypy over the whole `quantbench` package. Needs .venv (scripts/setup.sh).
# mypy reads a package, and the three code folders become `quantbench.*` only through setuptools'
# package-dir mapping, which mypy does not follow: build/typecheck/quantbench is that mapping as symlinks.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
root=build/typecheck
mkdir -p "$root/quantbench"
ln -sfn "$PWD/quantbench_pkg/__init__.py" "$root/quantbench/__init__.py"
for d in kernels methods harness; do ln -sfn "$PWD/$d" "$root/quantbench/$d"; done
MYPYPATH="$root" .venv/bin/mypy -p quantbench --cache-dir build/mypy-cache
