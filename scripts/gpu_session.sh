#!/usr/bin/env bash
# One short session on a lent, offline GPU machine: the kernel check, the end-to-end device check and the
# compiled (CUDA graph) decode latency, each stage independent, wall times and a summary last.
#
# Device:  OUT=<empty dir> bash scripts/gpu_session.sh        (run from the repository root)
#   carried ignored paths: .whl (pure-python wheels the machine lacks: gguf) and .devcache (QUANTBENCH_CACHE
#   with only the wiki corpus wheel and its byte-tokenizer token files, what the random-model runs read);
#   scripts/gpu_session_prep.sh builds both here first.
# Here (CPU): QB_DEVICE=cpu QB_STAGES=B,C PY=.venv/bin/python QB_LIMIT=1 QB_CELLS=fp,rtn-w4g128 \
#   QB_MODEL='{random: llama, hidden_size: 256, layers: 2, seed: 0}' OUT=/tmp/gs bash scripts/gpu_session.sh
#
# Stages (QB_STAGES, run in the order given; default B,C,A so the kernel check, which saves a record per
# kernel and so survives a cut, takes whatever time is left):
#   A  kernels: python -m quantbench.harness.tools.gpu_check (validate + time every Triton kernel)
#   B  e2e:     gpu_check --e2e on the first model of suites/gpu-smoke.yaml (the seeded random llama), device vs CPU
#   C  latency: decode ms/token + prefill tok/s, eager and `latency: {compile: true}`, fp and rtn-w4g128,
#               float32 and bfloat16 random llama
# Files under $OUT (8 at most): session.log kernels.log kernels.jsonl e2e.log e2e.json e2e-runs.tgz
# latency.log latency.jsonl.  Env: PY (python, default python3), QB_DEVICE (cuda), QB_BUDGET (s, default 460:
# all stages together), TB/TC (stage timeouts, s: 190/130), TA (cap on the kernel stage, 300; it gets at most
# what is left of QB_BUDGET), QB_LIMIT (e2e windows, 2), QB_CELLS (e2e cell globs), QB_MODEL (e2e model spec),
# QB_LAT_HIDDEN (stage C's hidden size, 1024), QB_KERNELS (gpu_check --only: a substring of kernel names).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DEV=${QB_DEVICE:-cuda}
STAGES=${QB_STAGES:-B,C,A}
BUDGET=${QB_BUDGET:-460}
TA=${TA:-300}
TB=${TB:-190}
TC=${TC:-130}
LIMIT=${QB_LIMIT:-2}
WORK=$(mktemp -d /tmp/qb-session.XXXXXX)
exec > >(tee -a "$OUT/session.log") 2>&1
declare -A RC WALL

now() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu-session +$(now)s] $*"; }

# ------------------------------------------------------------------ setup
say "setup: $(hostname), python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1), $(nproc) cpus"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  mkdir -p /tmp/site
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    say "pip install failed; unzipping the wheels instead (pure-python wheels only)"
    for w in .whl/*.whl; do $PY -m zipfile -e "$w" /tmp/site || say "could not unpack $w"; done
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the checkout root is the package (pyproject's package-dir): import it through a symlink, no install
ln -s "$PWD" "$WORK/quantbench"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .devcache ]; then
  mkdir -p "$WORK/cache" && cp -r .devcache/. "$WORK/cache/"  # a writable copy: runs add reference caches
  export QUANTBENCH_CACHE="$WORK/cache"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NCPU=$(nproc); [ "$NCPU" -gt 16 ] && NCPU=16
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$NCPU} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$NCPU}
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"
command -v nvidia-smi > /dev/null && nvidia-smi -L
$PY - <<'EOF' 2>&1 || say "setup: the environment check failed"
import os, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"missing ({e})"
import gguf, transformers, quantbench
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()}"
      f"{', ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}), triton {tv}, "
      f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
print(f"gguf from {os.path.dirname(gguf.__file__)}; quantbench from {os.path.dirname(quantbench.__file__)}; "
      f"QUANTBENCH_CACHE={os.environ.get('QUANTBENCH_CACHE')}")
EOF
say "setup done"

# python -m MODULE ARGS... with INFO logging (each suite cell's time in the stage's log): "${PYM[@]}" MODULE ARGS...
PYM=("$PY" -c 'import logging, runpy, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
logging.getLogger("quantbench.harness.run.runner").setLevel(logging.DEBUG)  # a failing cell logs its traceback
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)')

left() { echo $(( BUDGET - $(now) )); }
cap() {  # cap SECONDS: the stage's timeout, at most what is left of the budget
  local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}

# ------------------------------------------------------------------ stage A: kernel check
stage_A() {
  local t; t=$(cap "$TA")
  [ "$t" -lt 30 ] && { echo "skipped: only ${t}s of the budget left"; return 3; }
  local only=(); [ -n "${QB_KERNELS:-}" ] && only=(--only "$QB_KERNELS")
  say "A: kernel check ${only[*]} (timeout ${t}s)"
  timeout -k 10 "$t" "${PYM[@]}" quantbench.harness.tools.gpu_check --out "$WORK/kc" ${only[@]+"${only[@]}"} > "$OUT/kernels.log" 2>&1
  local rc=$?
  [ -s "$WORK/kc/records.jsonl" ] && cp "$WORK/kc/records.jsonl" "$OUT/kernels.jsonl"
  if grep -q " passed, .* failed in " "$OUT/kernels.log"; then
    tail -n 45 "$OUT/kernels.log"
  else  # cut (or crashed) before its table: the per-kernel records it saved, one line each
    tail -n 8 "$OUT/kernels.log"
    [ -f "$OUT/kernels.jsonl" ] && $PY - "$OUT/kernels.jsonl" <<'EOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
ms = {r["cell"]: r for r in recs if r["metric"] == "kernel_ms"}
for r in recs:
    if r["metric"] != "kernel_rel_error":
        continue
    t = ms.get(r["cell"])
    p = (t or {}).get("protocol") or {}
    v = r["value"]
    print(f"{r['cell']:44s} {r['status']:6s} rel {'-' if v is None else format(v, '.2e')} "
          + (f"{t['value']:.4f} ms  fp16 {p.get('fp16_ms') or 0:.4f} ms  graph {p.get('graph_ms') or 0:.4f} ms"
             if t else "") + (f"  {r['error'][:80]}" if r.get("error") else ""))
print(f"{sum(r['status'] == 'ok' for r in recs if r['metric'] == 'kernel_rel_error')} ok of "
      f"{sum(r['metric'] == 'kernel_rel_error' for r in recs)} kernel cases recorded")
EOF
  fi
  return $rc
}

# ------------------------------------------------------------------ stage B: end to end, device vs CPU
stage_B() {
  local t model cells=()
  t=$(cap "$TB")
  [ "$t" -lt 30 ] && { echo "skipped: only ${t}s of the budget left"; return 3; }
  model=${QB_MODEL:-$($PY -c 'import yaml
m = dict(yaml.safe_load(open("suites/gpu-smoke.yaml"))["models"][0]); m.pop("device", None)
print(yaml.safe_dump(m, default_flow_style=True, sort_keys=False).strip())')}
  [ -n "${QB_CELLS:-}" ] && cells=(--cells "$QB_CELLS")
  say "B: e2e on $DEV, model $model, limit $LIMIT (timeout ${t}s)"
  timeout -k 10 "$t" "${PYM[@]}" quantbench.harness.tools.gpu_check --e2e --e2e-device "$DEV" --model "$model" \
    --limit "$LIMIT" ${cells[@]+"${cells[@]}"} --out "$WORK/e2e" > "$OUT/e2e.log" 2>&1
  local rc=$?
  [ -f "$WORK/e2e/e2e.json" ] && cp "$WORK/e2e/e2e.json" "$OUT/e2e.json"
  # the two run directories' records (a cut run keeps the cells it finished), not the whole run trees
  local recs; recs=$(cd "$WORK/e2e" 2>/dev/null && find . -name records.jsonl)
  [ -n "$recs" ] && (cd "$WORK/e2e" && tar czf "$OUT/e2e-runs.tgz" $recs)
  grep -E "^(model|random|smollm|e2e )" "$OUT/e2e.log" | tail -n 30 || tail -n 20 "$OUT/e2e.log"
  [ $rc -ne 0 ] && tail -n 15 "$OUT/e2e.log"
  return $rc
}

# ------------------------------------------------------------------ stage C: compiled decode latency
stage_C() {
  local t H=${QB_LAT_HIDDEN:-1024}; t=$(cap "$TC")
  [ "$t" -lt 20 ] && { echo "skipped: only ${t}s of the budget left"; return 3; }
  cat > "$WORK/latency.yaml" <<EOF
name: gpu-latency
description: decode ms/token and prefill tokens/s of fp and rtn-w4g128, eager and compiled, random llama on $DEV
models:
  - {random: llama, hidden_size: $H, layers: 2, seed: 0, device: $DEV}
  - {random: llama, hidden_size: $H, layers: 2, seed: 0, device: $DEV, dtype: bfloat16, name: random-llama-bf16}
seed: 0
eval: {dataset: wiki, protocol: gptq, seq_len: 128, max_windows: 1}
metrics: [decode_ms_per_token, prefill_tokens_per_s]
latency: {prompt_len: 128, context: 128, decode_tokens: 16, batch: 1, repeats: 3, warmup: 1}
cells:
  - {name: fp, method: fp}
  - {name: rtn-w4g128, method: rtn, params: {bits: 4, group_size: 128}}
  - {name: fp-compiled, method: fp, latency: {compile: true}}
  - {name: rtn-w4g128-compiled, method: rtn, params: {bits: 4, group_size: 128}, latency: {compile: true}}
EOF
  say "C: latency, eager and compiled, on $DEV (timeout ${t}s)"
  timeout -k 10 "$t" $PY -m quantbench.harness.cli run "$WORK/latency.yaml" --out "$WORK/lat" \
    > "$OUT/latency.log" 2>&1
  local rc=$?
  [ -f "$WORK/lat/records.jsonl" ] && cp "$WORK/lat/records.jsonl" "$OUT/latency.jsonl"
  $PY - "$WORK/lat/records.jsonl" <<'EOF' || tail -n 20 "$OUT/latency.log"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault((r["model"]["name"], r["cell"]), {})[r["metric"]] = r
print(f"{'model':26s} {'cell':22s} {'decode ms/tok':>13s} {'p90':>7s} {'prefill tok/s':>13s} {'mode':9s} "
      f"{'compile s':>9s} kernels / fallback")
for (model, cell), m in rows.items():
    d = m.get("decode_ms_per_token", {})
    p = d.get("protocol") or {}
    pre = m.get("prefill_tokens_per_s", {}).get("value")
    if d.get("status") != "ok":
        print(f"{model[-26:]:26s} {cell:22s} {d.get('status')}: {(d.get('error') or '')[:150]}")
        continue
    cs = p.get("compile_s")
    print(f"{model[-26:]:26s} {cell:22s} {d['value']:13.3f} {p.get('decode_ms_p90', 0):7.3f} "
          f"{pre if pre is None else format(pre, '13.0f')} {str(p.get('decode_mode')):9s} "
          f"{'-' if cs is None else format(cs, '9.1f')} {p.get('kernel_paths')} {p.get('compile_fallback') or ''}")
EOF
  [ $rc -ne 0 ] && tail -n 15 "$OUT/latency.log"
  return $rc
}

for s in ${STAGES//,/ }; do
  case $s in A|B|C) ;; *) say "unknown stage $s (A, B or C)"; continue ;; esac
  t=$(date +%s)
  echo; say "===== stage $s"
  "stage_$s"
  RC[$s]=$?
  WALL[$s]=$(( $(date +%s) - t ))
  say "stage $s: exit ${RC[$s]} in ${WALL[$s]}s"
done

echo; say "===== summary (device $DEV)"
for s in ${STAGES//,/ }; do
  [ -n "${RC[$s]:-}" ] || continue
  case ${RC[$s]} in 0) st=ok ;; 124|137) st="TIMEOUT" ;; 3) st=skipped ;; *) st="FAILED (exit ${RC[$s]})" ;; esac
  echo "  stage $s: $st, ${WALL[$s]}s"
done
ls -la "$OUT"
say "total $(now)s"
rm -rf "$WORK"
exec >&- 2>&-; wait  # let tee finish session.log
