"""Decode ms/token at a long context: transformers' fp DynamicCache vs the real quantized KV cache.

One process, one model (smollm2-135m, float32, CPU): quantize the KV path with a KV method
(default kvquant-4, 1% outliers), then time ``--new`` greedy decode steps after a ``--context``
token prefill with each cache (:func:`quantbench.methods.kvquant.decode_ms_per_token`), and print
one JSON line with p50/p90 ms/token, their ratio and the real cache's bytes (``--repeat N``: N
alternating fp / quantized measurements: each pair's p50s and the median ratio; ``fp_*``,
``quantized_*`` and ``ratio_p50`` are the last pair's).

    .venv/bin/python scripts/kv_decode_bench.py --context 4096 --new 8 --threads 1 --clock thread

The quantized cache decodes through :func:`quantbench.methods.kvquant.generate_with_cache`: on CPU the
fused C++ kernel :func:`~quantbench.kernels.kvcache.cpu_decode_attention` (built or loaded before the
first timed step; its build/load seconds are reported apart).  ``--clock thread`` times each step by
the main thread's CPU seconds (with ``--threads 1``: all of the step's work), which other processes'
load does not inflate; ``wall`` (default) is what a user waits.

``--attention-only``: no model; one smollm2-shaped layer (3 KV heads, 9 query heads, head dim 64)
of random K/V at ``--context`` tokens in a kvquant-4-like (1% outliers, 1 sink) and a kivi-2 store,
and the thread CPU time (median and min of 25, so load from other processes does not count) of one
decode step's attention: fp (DynamicCache's concatenation + SDPA), the dequantize path
(materialize, RoPE, SDPA) and the packed paths (:func:`~quantbench.kernels.kvcache.packed_decode_attention`,
scales folded into the query side and the softmax weights; :func:`~quantbench.kernels.kvcache.fused_decode_attention`,
table gathers written into one K/V buffer, then one SDPA) and the fused C++ kernel
(:func:`~quantbench.kernels.kvcache.cpu_decode_attention`, ``*_cpu_kernel``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--method", default="kvquant")
    ap.add_argument("--params", default='{"bits": 4, "outlier_frac": 0.01, "fisher": false}')
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure fp and quantized this many times, alternating (the ratio's spread under load)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: the main thread's CPU seconds per step (use with --threads 1 on a loaded machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.attention_only:
        attention_only(a.context)
        return
    from quantbench.harness.inputs import data as datamod
    from quantbench.harness.inputs.models import load_smollm2
    from quantbench.kernels.kvcache import load_cpu_decode_kernel
    from quantbench.methods import kvquant as kq
    from quantbench.methods.base import Calibration, build_method

    lm = load_smollm2()
    model = lm.model.eval()
    ids = datamod.tokens("wiki", "calib", lm.tokenizer)
    calib = Calibration(datamod.sample_calibration(ids, 4, 512, 0), "wiki", 0, lm.tokenizer)
    t0 = time.perf_counter()
    build_method(a.method, json.loads(a.params)).quantize(model, calib)
    qsec = time.perf_counter() - t0
    t0 = time.perf_counter()
    kernel = load_cpu_decode_kernel() is not None  # built once (then cached on disk): not in any timed step
    ksec = time.perf_counter() - t0
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    runs = []
    for _ in range(max(a.repeat, 1)):  # alternating, so a load change hits both sides alike
        fp = kq.decode_ms_per_token(model, a.context, a.new, quantized=False, clock=clock)
        q = kq.decode_ms_per_token(model, a.context, a.new, quantized=True, clock=clock)
        runs.append((fp["p50_ms"], q["p50_ms"]))
    ratios = sorted(qm / fm for fm, qm in runs)
    print(
        json.dumps(
            {
                "model": "smollm2-135m",
                "method": a.method,
                "params": json.loads(a.params),
                "context": a.context,
                "decode_steps": a.new,
                "threads": torch.get_num_threads(),
                "clock": a.clock,
                "quantize_s": round(qsec, 1),
                "cpu_kernel": kernel,
                "cpu_kernel_build_or_load_s": round(ksec, 1),
                "fp_dynamiccache_p50_ms": round(fp["p50_ms"], 1),
                "fp_p90_ms": round(fp["p90_ms"], 1),
                "quantized_cache_p50_ms": round(q["p50_ms"], 1),
                "quantized_p90_ms": round(q["p90_ms"], 1),
                "ratio_p50": round(q["p50_ms"] / fp["p50_ms"], 3),
                "repeats_fp_q_p50_ms": [[round(fm, 1), round(qm, 1)] for fm, qm in runs],
                "median_ratio": round(ratios[len(ratios) // 2], 3),
                "fp_kv_bytes": fp["kv_bytes"]["total"],
                "quantized_kv_bytes": q["kv_bytes"],
            }
        )
    )


def attention_only(T: int, H: int = 3, Hq: int = 9, D: int = 64, reps: int = 25) -> None:
    import torch.nn.functional as F

    from quantbench.kernels.kvcache import (
        KVSpec,
        QuantizedKVCache,
        apply_rope,
        cpu_decode_attention,
        fused_decode_attention,
        load_cpu_decode_kernel,
        packed_decode_attention,
    )

    t0 = time.perf_counter()
    have_cpu = load_cpu_decode_kernel() is not None
    build_s = round(time.perf_counter() - t0, 1)

    g = torch.Generator().manual_seed(0)
    k, v = 0.6 * torch.randn(1, H, T, D, generator=g), torch.randn(1, H, T, D, generator=g)
    q = torch.randn(1, Hq, 1, D, generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    ang = torch.arange(T + reps + 8).float()[:, None] * inv
    rope = (torch.cat([ang, ang], -1).cos()[None, None], torch.cat([ang, ang], -1).sin()[None, None])
    kt = k[0].transpose(0, 1)
    lo, hi = kt.quantile(0.005, dim=0).half(), kt.quantile(0.995, dim=0).half()
    cases = {
        "kvquant-4": (KVSpec("nuq", "channel", 4, outlier_frac=0.01, sink=1, centroids=torch.linspace(-1, 1, 16),
                             lo=lo, hi=hi),
                      KVSpec("nuq", "token", 4, outlier_frac=0.01, sink=1, centroids=torch.linspace(-1, 1, 16))),
        "kivi-2": (KVSpec("int", "channel", 2, 32, span_group=128), KVSpec("int", "token", 2, 32, residual=128)),
    }

    def cpu_ms(f: Any) -> tuple[float, float]:
        ts = []
        for _ in range(reps):
            t = time.thread_time()
            f()
            ts.append(time.thread_time() - t)
        ts.sort()
        return round(1000 * ts[reps // 2], 3), round(1000 * ts[0], 3)

    out: dict[str, Any] = {"context": T, "threads": torch.get_num_threads(), "unit": "thread CPU ms (p50, min)",
                           "cpu_kernel_build_or_load_s": build_s}
    x1 = k[:, :, :1]
    out["fp"] = cpu_ms(lambda: F.scaled_dot_product_attention(
        q, torch.cat([k, x1], 2), torch.cat([v, x1], 2), enable_gqa=True))
    for name, (ks, vs) in cases.items():
        lay = QuantizedKVCache([(ks, vs)]).layers[0]
        lay.k_store.append(k)
        lay.v_store.append(v)
        n = lay.k_store.length()

        def dequant(lay: Any = lay, n: int = n) -> torch.Tensor:
            kk = apply_rope(lay.k_store.materialize(torch.float32), rope[0][:, :, :n], rope[1][:, :, :n])
            vv = lay.v_store.materialize(torch.float32)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        def packed(lay: Any = lay) -> torch.Tensor:
            return packed_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)

        def fused(lay: Any = lay) -> torch.Tensor:
            return fused_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)

        out[f"{name}_dequantize"] = cpu_ms(dequant)
        out[f"{name}_packed_fold"] = cpu_ms(packed)
        out[f"{name}_packed_fused"] = cpu_ms(fused)
        if have_cpu:
            def cpu(lay: Any = lay) -> torch.Tensor:
                return cpu_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)

            out[f"{name}_cpu_kernel"] = cpu_ms(cpu)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
