"""Latency: prefill tokens/s at prompt length P and decode ms/token (p50, p90) at context C.

Protocol (optimum-benchmark style): ``warmup`` untimed runs, then ``repeats`` timed runs;
prefill is one forward of ``batch x prompt_len`` random tokens into a fresh cache; decode is
``decode_tokens`` greedy steps after a prefill of ``context`` tokens, each step timed alone.
On CUDA every timing is bracketed by ``torch.cuda.synchronize``.  A KV method's own cache
(``make_cache``) is used for decode where the chain has one, else transformers' DynamicCache.

Achieved bandwidth per decode step = (weight bytes from ``model_storage`` + KV bytes read) /
p50 step time, reported against the machine's copy bandwidth (a large tensor copy, measured
once per process) as a roofline percentage.  The 1-minute load average and the CPU time used by
other processes during the measurement are recorded; noisy measurements are flagged.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .metrics import CellContext, MetricResult

log = logging.getLogger(__name__)

DEFAULTS: dict[str, int] = {"prompt_len": 512, "context": 512, "decode_tokens": 32, "batch": 1,
                            "repeats": 3, "warmup": 1}
NOISY_P90_P50 = 1.5
_BANDWIDTH: dict[str, float] = {}


def validate_params(where: str, p: Any) -> dict[str, int]:
    """Check a ``latency:`` mapping (suite or cell level); returns it with defaults filled in."""
    from ...methods.base import ConfigError, did_you_mean

    if not isinstance(p, dict):
        raise ConfigError(f"{where}: latency must be a mapping, got {p!r}")
    for k, v in p.items():
        if k not in DEFAULTS:
            raise ConfigError(f"{where}: unknown latency key '{k}'{did_you_mean(str(k), DEFAULTS)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "warmup" else 1):
            raise ConfigError(f"{where}: latency.{k} must be a positive integer, got {v!r}")
    return {**DEFAULTS, **p}


def latency_params(ctx: CellContext) -> dict[str, int]:
    p = dict(DEFAULTS)
    p.update(ctx.suite.raw.get("latency") or {})
    p.update(getattr(ctx.cell, "latency", None) or {})
    return p


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def memory_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s (read + write of a ``nbytes`` tensor, best of ``repeats``), cached."""
    dev = torch.device(device)
    key = f"{dev}:{torch.get_num_threads()}"
    if key not in _BANDWIDTH:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats + 1):
            _sync(dev)
            t = time.perf_counter()
            dst.copy_(src)
            _sync(dev)
            best = min(best, time.perf_counter() - t)
        _BANDWIDTH[key] = 2 * nbytes / best
        del src, dst
    return _BANDWIDTH[key]


def _cpu_times() -> tuple[float, float] | None:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc, or None."""
    try:
        f = open("/proc/stat").readline().split()[1:]
        vals = [int(x) for x in f]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)
        s = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        return float(busy), float(int(s[11]) + int(s[12]))
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


def _kv_module(ctx: CellContext) -> Any:
    from .memory import kv_module_of

    return kv_module_of(ctx)


def _ids(model: torch.nn.Module, b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    return torch.randint(0, model.config.vocab_size, (b, n), generator=g).to(dev)  # type: ignore[union-attr,arg-type]  # HF model attribute on nn.Module


@torch.no_grad()
def _prefill(model: torch.nn.Module, ids: torch.Tensor, kv: Any) -> Any:
    from transformers.cache_utils import DynamicCache

    if kv is not None:
        cache = kv.make_cache(model)
        kv.generate_with_cache(model, ids, 0, cache)
        return cache
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def _decode(model: torch.nn.Module, ids: torch.Tensor, n: int, kv: Any, dev: torch.device) -> list[float]:
    """Per-step seconds of ``n`` greedy decode steps after prefilling ``ids``."""
    from transformers.cache_utils import DynamicCache

    times: list[float] = []
    if kv is not None:
        if dev.type == "cuda":  # the KV method's loop times steps itself; make them synchronous
            raise NotImplementedError("KV-method decode timing on CUDA")
        kv.generate_with_cache(model, ids, n, kv.make_cache(model), times)
        return times
    cache = DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(n):
        _sync(dev)
        t = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return times


def workloads(ctx: CellContext, p: dict[str, int]) -> tuple[Callable[[], int], Callable[[], int]]:
    """(prefill, decode) callables returning tokens processed (used by the energy metric)."""
    model, kv = ctx.model, _kv_module(ctx)
    dev = next(model.parameters()).device
    pre_ids = _ids(model, p["batch"], p["prompt_len"], ctx.seed)
    ctx_ids = _ids(model, p["batch"], p["context"], ctx.seed + 1)

    def prefill() -> int:
        _prefill(model, pre_ids, kv)
        return p["batch"] * p["prompt_len"]

    def decode() -> int:
        _decode(model, ctx_ids, p["decode_tokens"], kv, dev)
        return p["batch"] * p["decode_tokens"]

    return prefill, decode


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure_latency(ctx: CellContext) -> dict[str, Any]:
    """One prefill + decode measurement of the cell (memoized in ``ctx.memo['latency']``)."""
    if "latency" in ctx.memo:
        return ctx.memo["latency"]
    from .memory import measure_kv_bytes_per_token
    from ...methods.base import model_storage

    p = latency_params(ctx)
    model, kv = ctx.model, _kv_module(ctx)
    dev = next(model.parameters()).device
    pre_ids = _ids(model, p["batch"], p["prompt_len"], ctx.seed)
    ctx_ids = _ids(model, p["batch"], p["context"], ctx.seed + 1)
    bw = memory_bandwidth(dev)
    for _ in range(p["warmup"]):
        _prefill(model, pre_ids, kv)
        _decode(model, ctx_ids, min(4, p["decode_tokens"]), kv, dev)
    pre_t: list[float] = []
    steps: list[float] = []
    with LoadMonitor() as mon:
        for _ in range(p["repeats"]):
            _sync(dev)
            t = time.perf_counter()
            _prefill(model, pre_ids, kv)
            _sync(dev)
            pre_t.append(time.perf_counter() - t)
        for _ in range(p["repeats"]):
            steps += _decode(model, ctx_ids, p["decode_tokens"], kv, dev)
    weight_bytes = model_storage(model)["total"].total
    kvb = measure_kv_bytes_per_token(model, min(p["context"], 64), kv, ctx.seed)["bytes_per_token"]
    kv_read = kvb * p["batch"] * (p["context"] + p["decode_tokens"] / 2)  # mean cache length per step
    p50, p90 = _pct(steps, 0.5), _pct(steps, 0.9)
    gbs = (weight_bytes + kv_read) / p50
    mon_p = mon.protocol()
    reasons = []
    if p90 / p50 > NOISY_P90_P50:
        reasons.append(f"p90/p50 = {p90 / p50:.2f} > {NOISY_P90_P50}")
    cores = os.cpu_count() or 1
    for k in ("load1_before", "load1_after"):
        if mon_p[k] is not None and mon_p[k] > cores:
            reasons.append(f"{k} {mon_p[k]:.2f} > {cores} cores")
            break
    if dev.type == "cpu" and mon_p["other_processes_cpu_cores"] is not None \
            and mon_p["other_processes_cpu_cores"] + torch.get_num_threads() > cores + 0.25:
        reasons.append(f"other processes used {mon_p['other_processes_cpu_cores']:.2f} cores")
    res = {
        **p, "device": str(dev), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "cache": "DynamicCache" if kv is None else f"{getattr(kv, '__name__', type(kv).__name__)}.make_cache",
        "prefill_s": pre_t, "prefill_tokens_per_s": p["batch"] * p["prompt_len"] / statistics.median(pre_t),
        "decode_ms_p50": 1e3 * p50, "decode_ms_p90": 1e3 * p90, "decode_steps": len(steps),
        "weight_bytes": weight_bytes, "kv_bytes_read_per_step": kv_read,
        "achieved_gb_s": gbs / 1e9, "memory_bandwidth_gb_s": bw / 1e9, "roofline_pct": 100 * gbs / bw,
        **mon_p, "noisy": bool(reasons), "noisy_reasons": reasons,
    }
    if reasons:
        log.warning("%s: noisy latency measurement: %s", ctx.cell.name, "; ".join(reasons))
    ctx.memo["latency"] = res
    return res


def _protocol(r: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in drop}


def prefill_tokens_per_s(ctx: CellContext) -> list[MetricResult]:
    from .metrics import MetricResult

    r = measure_latency(ctx)
    return [MetricResult(r["prefill_tokens_per_s"], _protocol(r, ("prefill_tokens_per_s",)))]


def decode_ms_per_token(ctx: CellContext) -> list[MetricResult]:
    from .metrics import MetricResult

    r = measure_latency(ctx)
    return [MetricResult(r["decode_ms_p50"], _protocol(r, ("decode_ms_p50",)))]
