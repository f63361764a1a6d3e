"""Memory: peak process memory per phase and KV-cache bytes per token.

- Peak RSS is ``VmHWM`` from ``/proc/self/status``; :func:`reset_peak` resets it by writing ``5``
  to ``/proc/self/clear_refs`` (Linux >= 4.0), so the runner can measure quantize and eval apart.
  On CUDA, ``torch.cuda.max_memory_allocated`` (reset with ``reset_peak_memory_stats``) is added.
- KV bytes per token are measured from a real cache after a prefill of ``n`` tokens (the
  ``latency:`` block's ``context``): for a chain without a KV method the tensors of transformers'
  ``DynamicCache``; for a KV method (``Method.quantizes("kv")``) the cache it makes
  (``make_cache``), by its ``kv_bytes()``.  Beside it, the method's own byte formula
  (``Method.kv_cache_bytes``; the fp16 cache without a KV method) at the same length.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...methods.base import Method
from ...methods.kvcalc import fp16_cache_bytes, kv_shape
from ...methods.placement import model_device
from .base import CellContext, MetricResult, metric

log = logging.getLogger(__name__)

PROC = Path("/proc/self")


def rss_hwm_bytes(proc: Path = PROC) -> int | None:
    """Peak resident set size since the last reset (``VmHWM``), or None where /proc is absent."""
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak(proc: Path = PROC) -> bool:
    """Reset the peak counters (VmHWM and CUDA's); True when VmHWM could be reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        (proc / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak(proc: Path = PROC) -> dict[str, int | None]:
    """Peak memory since the last :func:`reset_peak`: process RSS and (on CUDA) allocated bytes."""
    out: dict[str, int | None] = {"rss_hwm_bytes": rss_hwm_bytes(proc)}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _value(p: dict[str, int | None]) -> int | None:
    if p.get("cuda_max_allocated_bytes"):
        return p["cuda_max_allocated_bytes"]
    return p.get("rss_hwm_bytes")


@metric("peak_memory_bytes", label="peak MB", unit="bytes", higher_is_better=False, order=7,
        tolerance={"rel": 0.10}, hardware_bound=True, scale=1e-6)
def peak_memory_bytes(ctx: CellContext) -> list[MetricResult]:
    """Peak memory of the cell: max over the quantize phase and the evaluation phase.

    The runner resets the counters before the method chain and stores the quantize-phase peak in
    ``ctx.memo["peak_quantize"]`` (then resets again); the eval phase is whatever ran since, and
    this metric runs the shared evaluation pass first so the eval peak covers it.
    """
    ctx.eval_stats()
    ev = peak()
    q = ctx.memo.get("peak_quantize") or {}
    phases = {"quantize": _value(q) if q else None, "eval": _value(ev)}
    vals = [v for v in phases.values() if v is not None]
    if not vals:
        return [MetricResult(None, status="unavailable",
                             error="no peak-memory counter here (/proc/self/status has no VmHWM, no CUDA)")]
    kind = "cuda_max_memory_allocated" if ev.get("cuda_max_allocated_bytes") else "process VmHWM (RSS)"
    return [MetricResult(float(max(vals)), {
        "counter": kind, "phases": phases, "quantize_detail": q, "eval_detail": ev,
        "reset": "clear_refs=5 before the method chain and after it",
        "includes": "the process: base model, the cell's copy, reference buffers, eval activations"})]


def dynamic_cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a transformers Cache holds (keys and values of every layer)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for k, v in zip(cache.key_cache, cache.value_cache, strict=True):  # older transformers
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


def cache_name(cache: Any) -> str:
    """The cache class, with its layer class when that is not transformers' plain one
    (the quantized caches are ``DynamicCache`` objects whose layers store packed K/V)."""
    layers = getattr(cache, "layers", None) or []
    kinds = sorted({type(layer).__name__ for layer in layers} - {"DynamicLayer"})
    return f"{type(cache).__name__}[{','.join(kinds)}]" if kinds else type(cache).__name__


def random_ids(model: torch.nn.Module, batch: int, n: int, seed: int) -> torch.Tensor:
    """``batch x n`` seeded random token ids on the model's device."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # drawn on the CPU: the same ids on every device
    dev = model_device(model)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=g, device="cpu").to(dev)  # type: ignore[union-attr,arg-type]  # HF model attribute on nn.Module


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, kv: Method | None) -> Any:
    """A fresh cache with ``ids`` prefilled: the KV method's own, else transformers' DynamicCache."""
    from transformers.cache_utils import DynamicCache

    if kv is not None:
        cache = kv.make_cache(model)
        kv.generate(model, ids, 0, cache)
        return cache
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    return cache


def measure_kv_bytes_per_token(model: torch.nn.Module, n: int = 256, kv: Method | None = None,
                               seed: int = 0) -> dict[str, Any]:
    """Prefill ``n`` random tokens into a real cache (:func:`prefill`) and divide its bytes by ``n``."""
    cache = prefill(model, random_ids(model, 1, n, seed), kv)
    if kv is not None:
        parts = dict(cache.kv_bytes())
        static = parts.get("static", 0)
        return {"bytes_per_token": (parts["total"] - static) / n, "static_bytes": static,
                "components": parts, "cache": cache_name(cache), "prefill_tokens": n}
    total = dynamic_cache_bytes(cache)
    return {"bytes_per_token": total / n, "static_bytes": 0, "components": {"total": total},
            "cache": type(cache).__name__, "prefill_tokens": n}


@metric("kv_bytes_per_token", label="KV B/tok", unit="bytes", higher_is_better=False, order=6,
        tolerance={"rel": 0.0}, params="latency")
def kv_bytes_per_token(ctx: CellContext) -> list[MetricResult]:
    """Bytes per token of the cell's real KV cache after a prefill of ``latency.context`` tokens."""
    n = ctx.params["latency"].context
    r = measure_kv_bytes_per_token(ctx.model, n, ctx.kv_method, ctx.seed)
    proto = {k: v for k, v in r.items() if k != "bytes_per_token"}
    calc = calculator_bytes_per_token(ctx, n)
    if calc is not None:
        proto["calc_bytes_per_token"] = calc  # the calculator at the same context, static state excluded
    return [MetricResult(float(r["bytes_per_token"]), proto)]


def calculator_bytes_per_token(ctx: CellContext, n: int) -> float | None:
    """The byte formula of the cell's KV method (or of the fp16 cache) at ``n`` tokens, excluding the
    calibrated per-layer state, as the measurement counts; None when the model shape is unknown."""
    cfg = getattr(ctx.model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        return None
    kv = ctx.kv_method
    shape = kv_shape(ctx.model)
    b = kv.kv_cache_bytes(**shape, tokens=n) if kv is not None else fp16_cache_bytes(**shape, tokens=n)
    per_token = (b["total"] - b["static"]) / n
    if kv is None:  # transformers' DynamicCache holds K/V in the model's dtype
        per_token *= next(ctx.model.parameters()).element_size() / 2
    return per_token
