#!/usr/bin/env bash
# Validate and time every Triton kernel on one NVIDIA GPU (under 9.5 minutes, autotuning included), summary table last.
# Needs a Python with this project's deps and a CUDA torch + triton (e.g. the GPU machine's own);
# set PY to choose it. Extra arguments go to `quantbench gpu-check` (e.g. --suites smoke,default).
# On a CPU: scripts/gpu_check.sh --dry-run  (TRITON_INTERPRET=1, small shapes, no timings).
# End to end: scripts/gpu_check.sh --e2e  (suites/gpu-smoke.yaml on cuda, then on the CPU, compared; its CPU
# form: --e2e --e2e-device cpu). TIMEOUT (seconds, default 570) bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import quantbench.harness" 2>/dev/null; then
  # no install (the GPU machine is offline): the checkout root is the package (pyproject's package-dir)
  site=$(mktemp -d); ln -s "$PWD" "$site/quantbench"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout "${TIMEOUT:-570}" "$PY" -m quantbench.harness.tools.gpu_check --out "${OUT:-results/runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}" "$@"
