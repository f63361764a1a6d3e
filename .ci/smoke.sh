#!/usr/bin/env bash
# CI regression gate: run the smoke suite into a temp dir and compare it with the committed baseline.
# Exit 1 on a regression or a failed cell (Markdown diff on stdout; JSON summary next to the run).
# Needs .venv (scripts/setup.sh). Refresh the baseline in a reviewed commit:
#   .venv/bin/quantbench run suites/smoke.yaml --out /tmp/s && .venv/bin/quantbench baseline update /tmp/s
set -uo pipefail
cd "$(dirname "$0")/.."
export TQDM_DISABLE=1 QUANTBENCH_SCREENSHOT=${QUANTBENCH_SCREENSHOT:-0}
out=$(mktemp -d "${TMPDIR:-/tmp}/quantbench-smoke.XXXXXX")
.venv/bin/quantbench run suites/smoke.yaml --out "$out/run" --strict >"$out/run.log" 2>&1
run_rc=$?
if [ "$run_rc" -ne 0 ]; then
  echo "smoke run exited $run_rc (log: $out/run.log)" >&2
  tail -n 20 "$out/run.log" >&2
  [ -s "$out/run/records.jsonl" ] || exit 1
fi
.venv/bin/quantbench compare results/baselines/smoke.jsonl "$out/run" --json "$out/compare.json"
cmp_rc=$?
[ "$run_rc" -eq 0 ] && exit "$cmp_rc"
exit 1
