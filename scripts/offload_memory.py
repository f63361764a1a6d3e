"""Peak memory of whole-model vs block-wise (disk-offloaded) GPTQ on smollm2-135m.

Usage: .venv/bin/python scripts/offload_memory.py [--offload] [--samples 4]
Prints the process's peak RSS increase over the loaded model during quantization and, with
--offload, the most fp block bytes resident at once.
"""

import argparse
import copy
import gc
import json
import time

from quantbench.harness.inputs import data
from quantbench.harness.inputs.models import load_smollm2
from quantbench.harness.measure.memory import reset_peak, rss_hwm_bytes
from quantbench.methods.base import Calibration, build_method
from quantbench.methods.offload import resident_bytes

ap = argparse.ArgumentParser()
ap.add_argument("--offload", action="store_true")
ap.add_argument("--samples", type=int, default=4)
args = ap.parse_args()
lm = load_smollm2()
ids = data.tokens("wiki", "calib", lm.tokenizer)
calib = Calibration(data.sample_calibration(ids, args.samples, 512, 0), "wiki", 0)
model = copy.deepcopy(lm.model)
del lm
gc.collect()
blocks_fp = resident_bytes(model.model.layers)
reset_peak()
start = rss_hwm_bytes()
t = time.time()
m = build_method("gptq", {"bits": 4, "group_size": 128, "offload": args.offload})
m.quantize(model, calib)
print(json.dumps({"offload": args.offload, "seconds": round(time.time() - t, 1), "start_rss": start,
                  "peak_rss": rss_hwm_bytes(), "peak_increase": rss_hwm_bytes() - start,
                  "all_fp_blocks_bytes": blocks_fp, "one_fp_block_bytes": blocks_fp // 30,
                  "max_resident_fp_block_bytes": m.artifacts.get("offload_max_resident_block_bytes")}))
