"""Paired decode benchmark: eager vs compiled (StaticCache + torch.compile) ms/token per weight method.

One process, smollm2-135m (float32, CPU), batch 1: each method quantizes a fresh copy of the model, then
decodes after a ``--context`` token prefill, first through the eager loop (DynamicCache), then through
:class:`quantbench.methods.timing.StaticDecoder` (StaticCache, one-token step compiled; compile seconds
apart).  Per mode: p50/p90 wall ms/token and p50 CPU ms/token of the calling thread (``time.thread_time``,
which does not count time the thread waited for the CPU: a steadier number on a loaded machine) over
``--steps`` timed steps after ``--warmup`` untimed ones; ratios to fp32 from the same run; achieved GB/s
= stored weight bytes (``model_storage``) / p50 step, against the copy bandwidth
(:func:`~quantbench.harness.measure.latency.memory_bandwidth`).  ``--profile`` adds the ops that take
the compiled step's CPU time (torch.profiler, self CPU ms per step).  Prints one JSON object.

    .venv/bin/python scripts/decode_bench.py --threads 2
    .venv/bin/python scripts/decode_bench.py --threads 1 --methods fp,rtn-w4g128 --profile
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from typing import Any

import torch

from quantbench.harness.measure.latency import _pct as pct  # the latency metric's percentiles

#: the benchmark's cells: name -> (method, params)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp": ("fp", {}),
    "rtn-w4g128": ("rtn", {"bits": 4, "group_size": 128}),  # packed int4 (_weight_int4pack_mm_for_cpu)
    "bitnet-ptq": ("bitnet-ptq", {}),  # ternary codes, int8 activations (torch._int_mm)
    "rtn-w8": ("rtn", {"bits": 8, "group_size": -1}),  # per-channel int8 (_weight_int8pack_mm)
    "w8a8": ("w8a8", {}),  # SmoothQuant W8A8 (calibrated on 4 x 128 wiki tokens)
}


def timed(run: Any, steps: int) -> dict[str, Any]:
    """Wall and thread-CPU per-step times of ``run(times, clock)`` (each call decodes ``steps`` steps)."""
    wall: list[float] = []
    cpu: list[float] = []
    run(wall, time.perf_counter)
    run(cpu, time.thread_time)
    return {"p50_ms": 1e3 * pct(wall, 0.5), "p90_ms": 1e3 * pct(wall, 0.9), "p10_ms": 1e3 * pct(wall, 0.1),
            "cpu_p50_ms": 1e3 * pct(cpu, 0.5), "cpu_min_ms": 1e3 * min(cpu), "steps": len(wall)}


def profile_step(dec: Any, ids: torch.Tensor, steps: int, top: int = 12) -> list[dict[str, Any]]:
    """Self CPU ms per decode step of the ops that dominate the compiled step: ``steps`` steps after an
    unprofiled prefill, under torch.profiler (wall time of each op, so other processes' load inflates it)."""
    from torch.profiler import ProfilerActivity, profile

    dec.cache.reset()
    with torch.no_grad():
        nxt = dec.model(ids, past_key_values=dec.cache, use_cache=True).logits[:, -1:].argmax(-1)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=dec.skip_guards):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    nxt = dec.step(nxt, past_key_values=dec.cache, use_cache=True).logits[:, -1:].argmax(-1)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key[:80], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per mode (p50 over them)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps per mode before timing")
    ap.add_argument("--methods", default="fp,rtn-w4g128,bitnet-ptq,rtn-w8,w8a8")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: methods.timing.compile_mode)")
    ap.add_argument("--profile", action="store_true", help="profile the compiled step of each method")
    ap.add_argument("--cpp-wrapper", action="store_true", help="inductor option cpp_wrapper (instead of --mode)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers.cache_utils import DynamicCache

    from quantbench.harness.inputs import data as datamod
    from quantbench.harness.inputs.models import load_smollm2
    from quantbench.harness.measure.latency import LoadMonitor, kernel_paths, memory_bandwidth
    from quantbench.methods.base import Calibration, build_method, model_storage
    from quantbench.methods.timing import StaticDecoder, greedy_decode

    names = [m for m in a.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {list(METHODS)}")
    modes = [m for m in a.modes.split(",") if m]
    lm = load_smollm2()
    base = lm.model.eval()
    calib = None
    if "w8a8" in names:
        ids = datamod.tokens("wiki", "calib", lm.tokenizer)
        calib = Calibration(datamod.sample_calibration(ids, 4, 128, 0), "wiki", 0, lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    ctx_ids = torch.randint(0, base.config.vocab_size, (1, a.context), generator=g)
    bw = memory_bandwidth("cpu")
    n = a.warmup + a.steps
    out: dict[str, Any] = {"model": "smollm2-135m", "dtype": "float32", "context": a.context, "batch": 1,
                           "threads": torch.get_num_threads(), "cores": os.cpu_count(), "steps": a.steps,
                           "warmup_steps": a.warmup, "memory_bandwidth_gb_s": round(bw / 1e9, 1),
                           "lm_head_bytes": base.lm_head.weight.numel() * base.lm_head.weight.element_size(),
                           "loadavg_start": open("/proc/loadavg").read().split()[:3], "methods": {}}
    with LoadMonitor() as mon:
        for name in names:
            meth, params = METHODS[name]
            model = copy.deepcopy(base)
            t = time.perf_counter()
            build_method(meth, params).quantize(model, calib if meth == "w8a8" else None)
            model.eval()
            wb = model_storage(model)["total"].total
            r: dict[str, Any] = {"method": meth, "params": params, "quantize_s": round(time.perf_counter() - t, 1),
                                 "weight_bytes": wb, "kernel_paths": kernel_paths(model, torch.device("cpu"))}

            def keep(times: list[float], res: list[float]) -> None:
                res += times[a.warmup:]

            if "eager" in modes:
                def eager(res: list[float], clock: Any, model: Any = model) -> None:
                    times: list[float] = []
                    greedy_decode(model, ctx_ids, n, DynamicCache(), times, clock=clock)
                    keep(times, res)

                r["eager"] = timed(eager, a.steps)
            if "compiled" in modes:
                dec = StaticDecoder(model, a.context + n, mode=a.mode,
                                    options={"cpp_wrapper": True} if a.cpp_wrapper else None)

                def compiled(res: list[float], clock: Any, dec: Any = dec) -> None:
                    times: list[float] = []
                    dec.decode(ctx_ids, n, times, clock=clock)
                    keep(times, res)

                r["compiled"] = {**timed(compiled, a.steps), **dec.protocol()}
                if a.profile and dec.fallback is None:
                    r["compiled"]["profile"] = profile_step(dec, ctx_ids, 8)
            for mode in modes:
                if mode in r:
                    r[mode]["achieved_gb_s"] = wb / (r[mode]["p50_ms"] / 1e3) / 1e9
                    r[mode]["achieved_gb_s_cpu_clock"] = wb / (r[mode]["cpu_p50_ms"] / 1e3) / 1e9
                    r[mode]["stream_floor_ms"] = 1e3 * wb / bw
            out["methods"][name] = r
            del model
            gc.collect()
    fp = out["methods"].get("fp")
    if fp is not None:
        for r in out["methods"].values():
            for mode in modes:
                if mode in r and mode in fp:
                    r[mode]["speedup_vs_fp32"] = fp[mode]["p50_ms"] / r[mode]["p50_ms"]
                    r[mode]["speedup_vs_fp32_cpu_clock"] = fp[mode]["cpu_p50_ms"] / r[mode]["cpu_p50_ms"]
    out.update(mon.protocol())
    out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]

    def rnd(x: Any) -> Any:
        if isinstance(x, float):
            return round(x, 3)
        if isinstance(x, dict):
            return {k: rnd(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rnd(v) for v in x]
        return x

    print(json.dumps(rnd(out)))


if __name__ == "__main__":
    main()
