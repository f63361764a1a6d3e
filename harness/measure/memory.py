"""Memory: peak process memory per phase and KV-cache bytes per token.

- Peak RSS is ``VmHWM`` from ``/proc/self/status``; :func:`reset_peak` resets it by writing ``5``
  to ``/proc/self/clear_refs`` (Linux >= 4.0), so the runner can measure quantize and eval apart.
  On CUDA, ``torch.cuda.max_memory_allocated`` (reset with ``reset_peak_memory_stats``) is added.
- KV bytes per token are measured from a real cache after a prefill of ``n`` tokens: for an
  unquantized model the tensors of transformers' ``DynamicCache``; for a KV method (one whose
  module provides ``make_cache``) its cache's ``kv_bytes()``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .metrics import CellContext, MetricResult

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


def peak_memory_bytes(ctx: CellContext) -> list[MetricResult]:
    """Peak memory of the cell: max over the quantize phase and the evaluation phase.

    The runner resets the counters before the method chain and stores the quantize-phase peak in
    ``ctx.memo["peak_quantize"]`` (then resets again); the eval phase is whatever ran since, and
    this metric runs the shared evaluation pass first so the eval peak covers it.
    """
    from .metrics import MetricResult

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


@torch.no_grad()
def measure_kv_bytes_per_token(model: torch.nn.Module, n: int = 256, kv_module: Any = None,
                               seed: int = 0) -> dict[str, Any]:
    """Prefill ``n`` random tokens into a real cache and divide its bytes by ``n``."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(dev)  # type: ignore[union-attr,arg-type]  # HF model attribute on nn.Module
    if kv_module is not None:
        cache = kv_module.make_cache(model)
        kv_module.generate_with_cache(model, ids, 0, cache)
        parts = dict(cache.kv_bytes())
        static = parts.get("static", 0)
        return {"bytes_per_token": (parts["total"] - static) / n, "static_bytes": static,
                "components": parts, "cache": cache_name(cache), "prefill_tokens": n}
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    total = dynamic_cache_bytes(cache)
    return {"bytes_per_token": total / n, "static_bytes": 0, "components": {"total": total},
            "cache": type(cache).__name__, "prefill_tokens": n}


def kv_module_of(ctx: CellContext) -> Any:
    """The module of the first method in the chain that provides ``make_cache`` (a KV method), or None."""
    import sys

    for m in ctx.methods:
        if hasattr(m, "make_cache") and hasattr(m, "generate_with_cache"):
            return m
        mod = sys.modules.get(type(m).__module__)
        if getattr(m, "target", None) in ("kv", "kv_cache", "attention") or _is_kv_method(m):
            if mod is not None and hasattr(mod, "make_cache") and hasattr(mod, "generate_with_cache"):
                return mod
    return None


def _is_kv_method(m: Any) -> bool:
    return any(c.__name__ == "_KVMethod" for c in type(m).__mro__)


def kv_bytes_per_token(ctx: CellContext) -> list[MetricResult]:
    from .metrics import MetricResult

    n = int(_latency_params(ctx).get("context", 256))
    r = measure_kv_bytes_per_token(ctx.model, n, kv_module_of(ctx), ctx.seed)
    proto = {k: v for k, v in r.items() if k != "bytes_per_token"}
    calc = calculator_bytes_per_token(ctx, n)
    if calc is not None:
        proto["calc_bytes_per_token"] = calc  # the calculator at the same context, static state excluded
    return [MetricResult(float(r["bytes_per_token"]), proto)]


def calculator_bytes_per_token(ctx: CellContext, n: int) -> float | None:
    """kvcalc's bytes/token for the cell's KV method (or the fp16 cache) at ``n`` tokens, excluding the
    calibrated per-layer state, as the measurement counts; None when the model shape is unknown."""
    from ...methods.kvcalc import kv_cache_bytes

    cfg = getattr(ctx.model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        return None
    kv = next((m for m in ctx.methods if _is_kv_method(m)), None)
    method, params = ("kv-fp16", {}) if kv is None else (kv.name, kv.config.to_dict())
    from ...methods.kvquant import head_dim_of, kv_heads_of

    b = kv_cache_bytes(method, params, n_layers=cfg.num_hidden_layers, n_kv_heads=kv_heads_of(ctx.model),
                       head_dim=head_dim_of(ctx.model), tokens=n)
    per_token = (b["total"] - b["static"]) / n
    if kv is None:  # transformers' DynamicCache holds K/V in the model's dtype
        per_token *= next(ctx.model.parameters()).element_size() / 2
    return per_token


def _latency_params(ctx: CellContext) -> dict[str, Any]:
    from .latency import latency_params

    return latency_params(ctx)
