"""Latency: prefill tokens/s at prompt length P and decode ms/token (p50, p90) at context C.

Protocol (optimum-benchmark style): ``warmup`` untimed runs, then ``repeats`` timed runs;
prefill is one forward of ``batch x prompt_len`` random tokens into a fresh cache; decode is
``decode_tokens`` greedy steps after a prefill of ``context`` tokens, each step timed alone by the
one decode timer (:func:`quantbench.methods.timing.greedy_decode`).  On CUDA every timing is
bracketed by ``torch.cuda.synchronize``.  The chain's KV method (``Method.quantizes("kv")``) supplies
the cache and the decoding (``make_cache``, ``generate``), else transformers' DynamicCache is used.
The parameters are the suite's ``latency:`` block (:class:`LatencyParams`).

``compile: true`` (opt-in) decodes a weight-quantized chain through transformers' StaticCache with the
one-token step compiled (:class:`quantbench.methods.timing.StaticDecoder`), so that the per-step Python
and dispatch overhead of the eager loop does not hide the kernels' differences; the compile seconds, the
mode and any fallback to the eager loop (a step that cannot be traced) are in the protocol, and the
leaderboard tag gains ``/compiled``.  A KV method's chain keeps its own cache and eager decoding.

Achieved bandwidth per decode step = (weight bytes from ``model_storage`` + KV bytes read) /
p50 step time, reported against the machine's copy bandwidth (a large tensor copy, measured
once per process) as a roofline percentage; ``stream_floor_ms`` is the time those bytes take at that
bandwidth and ``above_floor_ms`` the rest of the p50 step (the overhead the kernels did not hide).
The 1-minute load average and the CPU time used by other processes during the measurement are
recorded; noisy measurements are flagged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...methods.base import ConfigError, Method, QuantizedModule, did_you_mean, dtype_name, model_storage
from ...methods.gguf_export import export_gguf
from ...methods.placement import model_device
from ...methods.timing import StaticDecoder, greedy_decode, sync, timed, timer_name
from ..tools import llamacpp
from .base import PARAM_BLOCKS, CellContext, MetricResult, metric
from .memory import measure_kv_bytes_per_token, prefill, random_ids

log = logging.getLogger(__name__)

NOISY_P90_P50 = 1.5
_BANDWIDTH: dict[str, float] = {}


@PARAM_BLOCKS.register("latency")
@dataclass(frozen=True)
class LatencyParams:
    """The ``latency:`` block, suite level overridden key by key per cell; read by the latency, energy
    and KV-bytes metrics."""

    prompt_len: int = 512
    context: int = 512
    decode_tokens: int = 32
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    compile: bool = False  # decode through a StaticCache with the step compiled (weight methods only)

    @classmethod
    def parse(cls, where: str, *layers: Any) -> LatencyParams:
        """Check each layer (a mapping; None when absent) and merge them, in order, over the defaults."""
        keys = [f.name for f in dataclasses.fields(cls)]
        merged: dict[str, Any] = {}
        for p in layers:
            if p is None:
                continue
            if not isinstance(p, dict):
                raise ConfigError(f"{where}: latency must be a mapping, got {p!r}")
            for k, v in p.items():
                if k not in keys:
                    raise ConfigError(f"{where}: unknown latency key '{k}'{did_you_mean(str(k), keys)}")
                if k == "compile":
                    if not isinstance(v, bool):
                        raise ConfigError(f"{where}: latency.compile must be true or false, got {v!r}")
                elif not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "warmup" else 1):
                    raise ConfigError(f"{where}: latency.{k} must be a positive integer, got {v!r}")
            merged.update(p)
        return cls(**merged)


def validate_params(where: str, p: Any) -> dict[str, Any]:
    """Check one ``latency:`` mapping (suite or cell level); returns it with the defaults filled in."""
    return dataclasses.asdict(LatencyParams.parse(where, p))


def latency_tag(p: dict[str, Any]) -> str:
    """Timings are comparable only at the same prompt length, context and batch, and decode mode."""
    tag = "/".join(f"{k}{p[k]}" for k in ("prompt_len", "context", "batch") if k in p)
    return tag + ("/compiled" if p.get("compile") else "")


def memory_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s (read + write of a ``nbytes`` tensor, best of ``repeats``), cached."""
    dev = torch.device(device)
    key = f"{dev}:{torch.get_num_threads()}"
    if key not in _BANDWIDTH:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats + 1):
            sync(dev)
            t = time.perf_counter()
            dst.copy_(src)
            sync(dev)
            best = min(best, time.perf_counter() - t)
        _BANDWIDTH[key] = 2 * nbytes / best
        del src, dst
    return _BANDWIDTH[key]


def _cpu_times() -> tuple[float, float] | None:
    """(busy jiffies of the whole machine, jiffies of this process and its waited-for children) from /proc,
    or None."""
    try:
        f = open("/proc/stat").readline().split()[1:]
        vals = [int(x) for x in f]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        s = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        # this process's CPU time and its waited-for children's (an engine timed as a subprocess is ours)
        return float(busy), float(sum(int(v) for v in s[11:15]))
    except (OSError, ValueError, IndexError):
        return None


class LoadMonitor:
    """Load average and other processes' CPU use (in cores) over a measurement."""

    def __enter__(self) -> LoadMonitor:
        self.t0, self.c0 = time.perf_counter(), _cpu_times()
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        c1 = _cpu_times()
        self.load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.other_cores = None
        if self.c0 and c1 and self.seconds > 0:
            hz = os.sysconf("SC_CLK_TCK")
            other = (c1[0] - self.c0[0]) - (c1[1] - self.c0[1])
            self.other_cores = max(0.0, other / hz / self.seconds)

    def protocol(self) -> dict[str, Any]:
        return {"load1_before": self.load_before, "load1_after": self.load_after,
                "other_processes_cpu_cores": None if self.other_cores is None else round(self.other_cores, 3),
                "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _decode(model: torch.nn.Module, ids: torch.Tensor, n: int, kv: Method | None,
            dec: StaticDecoder | None = None) -> list[float]:
    """Per-step seconds of ``n`` greedy decode steps after prefilling ``ids``: through the KV method's
    cache and decoding where the chain has one, else the static decoder when given, else a DynamicCache."""
    from transformers.cache_utils import DynamicCache

    times: list[float] = []
    if kv is not None:
        kv.generate(model, ids, n, kv.make_cache(model), times)
    elif dec is not None:
        dec.decode(ids, n, times)
    else:
        greedy_decode(model, ids, n, DynamicCache(), times)
    return times


def static_decoder(ctx: CellContext, p: LatencyParams) -> StaticDecoder | None:
    """The cell's compiled decoder (one per cell, in ``ctx.memo``) when ``p.compile`` and the chain has no
    KV method; else None (the eager loop)."""
    if not p.compile or ctx.kv_method is not None:
        return None
    if "static_decoder" not in ctx.memo:
        ctx.memo["static_decoder"] = StaticDecoder(ctx.model, p.context + p.decode_tokens)
    return ctx.memo["static_decoder"]


def _decode_protocol(ctx: CellContext, p: LatencyParams, dec: StaticDecoder | None) -> dict[str, Any]:
    if dec is not None:
        return dec.protocol()
    out: dict[str, Any] = {"decode_mode": "eager"}
    if p.compile:  # asked for, but a KV method decodes through its own cache
        name = getattr(ctx.kv_method, "name", "?")
        out["compile_fallback"] = f"the KV method {name} decodes through its own cache (eager)"
    return out


def workloads(ctx: CellContext, p: LatencyParams) -> tuple[Callable[[], int], Callable[[], int]]:
    """(prefill, decode) callables returning tokens processed (used by the energy metric)."""
    model, kv = ctx.model, ctx.kv_method
    dec = static_decoder(ctx, p)
    pre_ids = random_ids(model, p.batch, p.prompt_len, ctx.seed)
    ctx_ids = random_ids(model, p.batch, p.context, ctx.seed + 1)

    def prefill_fn() -> int:
        prefill(model, pre_ids, kv)
        return p.batch * p.prompt_len

    def decode_fn() -> int:
        _decode(model, ctx_ids, p.decode_tokens, kv, dec)
        return p.batch * p.decode_tokens

    return prefill_fn, decode_fn


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _noise_reasons(p50: float, p90: float, mon_p: dict[str, Any], cpu_threads: int | None) -> list[str]:
    reasons = []
    if p90 / p50 > NOISY_P90_P50:
        reasons.append(f"p90/p50 = {p90 / p50:.2f} > {NOISY_P90_P50}")
    cores = os.cpu_count() or 1
    for k in ("load1_before", "load1_after"):
        if mon_p[k] is not None and mon_p[k] > cores:
            reasons.append(f"{k} {mon_p[k]:.2f} > {cores} cores")
            break
    if cpu_threads is not None and mon_p["other_processes_cpu_cores"] is not None \
            and mon_p["other_processes_cpu_cores"] + cpu_threads > cores + 0.25:
        reasons.append(f"other processes used {mon_p['other_processes_cpu_cores']:.2f} cores")
    return reasons


def _engine_latency(ctx: CellContext, engine: str, p: LatencyParams) -> dict[str, Any]:
    """Latency of a format served by another engine, timed in that engine on the exported file; a dict
    with ``unavailable`` (the reason) when the engine is not installed or cannot run the chain."""
    base = {**dataclasses.asdict(p), "engine": engine}
    if engine != "llama.cpp":
        return {**base, "unavailable": f"no latency engine for {engine}"}
    if len(ctx.methods) != 1:
        return {**base, "unavailable": "llama.cpp times a GGUF file; this cell chains "
                f"{' + '.join(m.name for m in ctx.methods)}, which one file cannot hold"}
    if llamacpp.tool("llama-bench") is None:
        return {**base, "unavailable": "the GGUF format's latency is timed in llama.cpp (llama-bench), which is not "
                "built here (opt-in: scripts/setup_llamacpp.sh); quantbench's own forward for this cell runs "
                "float32 weights dequantized once and is not the format's speed"}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="qb-llamabench-") as tmp:
        path = export_gguf(ctx.model, ctx.base.tokenizer, ctx.base.info, Path(tmp) / "cell.gguf")
        with LoadMonitor() as mon:
            r = llamacpp.bench(path, p.prompt_len, p.context, p.decode_tokens, max(p.repeats, 2), threads, p.batch)
        file_bytes = path.stat().st_size
    steps = r["decode_ms_samples"]
    p50, p90 = _pct(steps, 0.5), _pct(steps, 0.9)
    mon_p = mon.protocol()
    reasons = _noise_reasons(p50, p90, mon_p, threads)
    return {**base, **{k: v for k, v in r.items() if k not in ("decode_ms_samples",)},
            "device": "cpu", "gguf_bytes": file_bytes,
            "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s_samples"]),
            "decode_ms_p50": p50, "decode_ms_p90": p90, "decode_ms_p10": _pct(steps, 0.1),
            "decode_samples": len(steps), "decode_ms_samples": steps,
            **mon_p, "noisy": bool(reasons), "noisy_reasons": reasons}


def kernel_paths(model: torch.nn.Module, device: torch.device) -> dict[str, int]:
    """How many quantized modules of ``model`` run their format's own kernel on ``device`` and how many a
    reference path (:meth:`QuantizedModule.kernel_path`): ``{"native": n, "reference": m}``."""
    out = {"native": 0, "reference": 0}
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            out["reference" if m.kernel_path(device) == "reference" else "native"] += 1
    return out


def measure_latency(ctx: CellContext) -> dict[str, Any]:
    """One prefill + decode measurement of the cell (memoized in ``ctx.memo['latency']``).

    A chain whose method names a ``serving_engine`` (llama.cpp's GGUF types) is timed in that engine,
    or reported unavailable: quantbench's reference forward for such a format is never its latency.
    Otherwise the protocol counts the quantized modules that ran a reference path on this device
    (``kernel_paths``; ``reference_path`` true when any did): the report marks such a timing as
    quantbench's reference forward, not the format's speed (FP4 on any device, FP8 without a scaled GEMM).
    """
    if "latency" in ctx.memo:
        return ctx.memo["latency"]
    p: LatencyParams = ctx.params["latency"]
    engine = next((m.serving_engine for m in ctx.methods if m.serving_engine), None)
    if engine is not None:
        ctx.memo["latency"] = _engine_latency(ctx, engine, p)
        return ctx.memo["latency"]
    model, kv = ctx.model, ctx.kv_method
    dev = model_device(model)
    pre_ids = random_ids(model, p.batch, p.prompt_len, ctx.seed)
    ctx_ids = random_ids(model, p.batch, p.context, ctx.seed + 1)
    bw = memory_bandwidth(dev)
    dec = static_decoder(ctx, p)  # compiles in its first call's untimed warm-up steps
    for _ in range(p.warmup):
        prefill(model, pre_ids, kv)
        _decode(model, ctx_ids, min(4, p.decode_tokens), kv, dec)
    pre_t: list[float] = []
    steps: list[float] = []
    with LoadMonitor() as mon:
        for _ in range(p.repeats):
            pre_t.append(timed(dev, lambda: prefill(model, pre_ids, kv))[1])
        for _ in range(p.repeats):
            steps += _decode(model, ctx_ids, p.decode_tokens, kv, dec)
    weight_bytes = model_storage(model)["total"].total
    paths = kernel_paths(model, dev)
    kvb = measure_kv_bytes_per_token(model, min(p.context, 64), kv, ctx.seed)["bytes_per_token"]
    kv_read = kvb * p.batch * (p.context + p.decode_tokens / 2)  # mean cache length per step
    if dec is not None and dec.fallback is None:  # a static cache's step attends over all its max_len slots
        kv_read = kvb * p.batch * dec.max_len
    p50, p90 = _pct(steps, 0.5), _pct(steps, 0.9)
    gbs = (weight_bytes + kv_read) / p50
    floor = (weight_bytes + kv_read) / bw  # seconds those bytes take at the machine's copy bandwidth
    mon_p = mon.protocol()
    reasons = _noise_reasons(p50, p90, mon_p, torch.get_num_threads() if dev.type == "cpu" else None)
    res = {
        **dataclasses.asdict(p), "engine": "quantbench", "device": str(dev),
        "dtype": dtype_name(next(model.parameters()).dtype),
        "cache": "DynamicCache" if kv is None else f"{type(kv).__module__}.make_cache",
        **_decode_protocol(ctx, p, dec),
        "timer": timer_name(dev), "prefill_s": pre_t,
        "prefill_tokens_per_s": p.batch * p.prompt_len / statistics.median(pre_t),
        "decode_ms_p50": 1e3 * p50, "decode_ms_p90": 1e3 * p90, "decode_ms_p10": 1e3 * _pct(steps, 0.1),
        "decode_steps": len(steps),
        "weight_bytes": weight_bytes, "kv_bytes_read_per_step": kv_read,
        "achieved_gb_s": gbs / 1e9, "memory_bandwidth_gb_s": bw / 1e9, "roofline_pct": 100 * gbs / bw,
        "stream_floor_ms": 1e3 * floor, "above_floor_ms": 1e3 * (p50 - floor),
        "kernel_paths": paths, "reference_path": paths["reference"] > 0,
        **mon_p, "noisy": bool(reasons), "noisy_reasons": reasons,
    }
    if reasons:
        log.warning("%s: noisy latency measurement: %s", ctx.cell, "; ".join(reasons))
    ctx.memo["latency"] = res
    return res


def _protocol(r: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in drop}


@metric("prefill_tokens_per_s", label="prefill tok/s", unit="tokens/s", higher_is_better=True, order=9,
        tolerance={"rel": 0.15}, hardware_bound=True, params="latency", tag=latency_tag)
def prefill_tokens_per_s(ctx: CellContext) -> list[MetricResult]:
    r = measure_latency(ctx)
    if "unavailable" in r:
        return [MetricResult(None, _protocol(r, ("unavailable",)), status="unavailable", error=r["unavailable"])]
    return [MetricResult(r["prefill_tokens_per_s"], _protocol(r, ("prefill_tokens_per_s",)))]


@metric("decode_ms_per_token", label="decode ms/tok", unit="ms", higher_is_better=False, order=10,
        tolerance={"rel": 0.15}, hardware_bound=True, params="latency", tag=latency_tag)
def decode_ms_per_token(ctx: CellContext) -> list[MetricResult]:
    """p50 of the decode steps (p90 and the rest of the measurement in the protocol)."""
    r = measure_latency(ctx)
    if "unavailable" in r:
        return [MetricResult(None, _protocol(r, ("unavailable",)), status="unavailable", error=r["unavailable"])]
    return [MetricResult(r["decode_ms_p50"], _protocol(r, ("decode_ms_p50",)))]
