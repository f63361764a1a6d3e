"""Decode ms/token at a long context: transformers' fp DynamicCache vs the real quantized KV cache.

One process, one model (smollm2-135m, float32, CPU): quantize the KV path with a KV method
(default kvquant-4, 1% outliers), then time ``--new`` greedy decode steps after a ``--context``
token prefill with each cache (:func:`quantbench.methods.kvquant.decode_ms_per_token`), and print
one JSON line with p50/p90 ms/token, their ratio and the real cache's bytes.

    .venv/bin/python scripts/kv_decode_bench.py --context 4096 --new 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--method", default="kvquant")
    ap.add_argument("--params", default='{"bits": 4, "outlier_frac": 0.01, "fisher": false}')
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from quantbench.harness.inputs import data as datamod
    from quantbench.harness.inputs.models import load_smollm2
    from quantbench.methods import kvquant as kq
    from quantbench.methods.base import Calibration, build_method

    lm = load_smollm2()
    model = lm.model.eval()
    ids = datamod.tokens("wiki", "calib", lm.tokenizer)
    calib = Calibration(datamod.sample_calibration(ids, 4, 512, 0), "wiki", 0, lm.tokenizer)
    t0 = time.perf_counter()
    build_method(a.method, json.loads(a.params)).quantize(model, calib)
    qsec = time.perf_counter() - t0
    fp = kq.decode_ms_per_token(model, a.context, a.new, quantized=False)
    q = kq.decode_ms_per_token(model, a.context, a.new, quantized=True)
    print(
        json.dumps(
            {
                "model": "smollm2-135m",
                "method": a.method,
                "params": json.loads(a.params),
                "context": a.context,
                "decode_steps": a.new,
                "threads": torch.get_num_threads(),
                "quantize_s": round(qsec, 1),
                "fp_dynamiccache_p50_ms": round(fp["p50_ms"], 1),
                "fp_p90_ms": round(fp["p90_ms"], 1),
                "quantized_cache_p50_ms": round(q["p50_ms"], 1),
                "quantized_p90_ms": round(q["p90_ms"], 1),
                "ratio_p50": round(q["p50_ms"] / fp["p50_ms"], 3),
                "fp_kv_bytes": fp["kv_bytes"]["total"],
                "quantized_kv_bytes": q["kv_bytes"],
            }
        )
    )


if __name__ == "__main__":
    main()
