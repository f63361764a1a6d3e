"""Quality and size metrics: perplexity, KL divergence and top-1 agreement (one shared evaluation
pass, :mod:`.evaluate`), bits per weight, weight bytes and quantization time.

Each is registered here with its facts (:func:`.base.metric`); the other metrics are registered in
``tasks.py`` (accuracy), ``memory.py`` (KV bytes, peak memory), ``latency.py`` and ``energy.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...methods.base import linear_weight_count
from .base import METRICS, CellContext, MetricResult, MetricSpec, metric

__all__ = ["METRICS", "CellContext", "MetricResult", "MetricSpec"]


def eval_tag(p: dict[str, Any]) -> str:
    """Perplexity protocols are comparable only on the same text, protocol, window length (and stride)."""
    tag = f"{p.get('dataset')}/{p.get('name')}/{p.get('seq_len')}"
    if p.get("name") == "sliding":
        tag += f"/s{p.get('stride')}"
    return tag


def _eval_protocol(ctx: CellContext) -> dict[str, Any]:
    return dict(ctx.eval_data.protocol)


@metric("perplexity", label="ppl", unit="ppl", higher_is_better=False, order=0, tolerance={"rel": 0.01},
        tag=eval_tag)
def perplexity(ctx: CellContext) -> list[MetricResult]:
    s = ctx.eval_stats()
    return [MetricResult(s.perplexity, _eval_protocol(ctx), stderr=s.perplexity_stderr())]


def _needs_reference(ctx: CellContext, name: str) -> MetricResult | None:
    if ctx.reference is None:
        return MetricResult(None, _eval_protocol(ctx), status="unavailable",
                            error=f"{name} needs the unquantized reference, which this run did not build")
    return None


@metric("kl_divergence", label="KL", unit="nats/token", higher_is_better=False, order=1,
        tolerance={"rel": 0.10, "abs": 1e-4}, fmt=".4f", tag=eval_tag)
def kl_divergence(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "kl_divergence")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    return [MetricResult(s.kl, {**_eval_protocol(ctx), "reference": "unquantized model, float32",
                                "direction": "KL(P_fp || P_quant), mean per token"})]


@metric("top1_agreement", label="top-1", unit="fraction", higher_is_better=True, order=2,
        tolerance={"abs": 0.01}, fmt=".3f", tag=eval_tag)
def top1_agreement(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "top1_agreement")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    return [MetricResult(s.top1, {**_eval_protocol(ctx), "reference": "unquantized model, float32"})]


@metric("bits_per_weight", label="bits/w", unit="bits", higher_is_better=False, order=4, tolerance={"rel": 0.0})
def bits_per_weight(ctx: CellContext) -> list[MetricResult]:
    st = ctx.storage()
    n_linear = linear_weight_count(ctx.model)
    lin = st["linear"]
    params = ctx.base.info.get("params") or 1
    return [MetricResult(
        8 * lin.total / n_linear,
        {"over": "linear layers of the transformer blocks (lm_head and embeddings excluded)",
         "linear_weights": n_linear,
         "quantized_only": 8 * (lin.packed_weights + lin.scales_zeros + lin.outliers) / lin.quantized_weights
         if lin.quantized_weights else None,
         "whole_model": 8 * st["total"].total / params},
    )]


@metric("weight_bytes", label="weight MB", unit="bytes", higher_is_better=False, order=5, tolerance={"rel": 0.0},
        scale=1e-6)
def weight_bytes(ctx: CellContext) -> list[MetricResult]:
    st = ctx.storage()
    t = st["total"]
    return [MetricResult(
        float(t.total),
        {"packed_weights": t.packed_weights, "scales_zeros": t.scales_zeros, "outliers": t.outliers,
         "unquantized": t.unquantized, "linear_total": st["linear"].total, "other_total": st["other"].total},
    )]


@metric("quantize_seconds", label="quant s", unit="s", higher_is_better=False, order=8, tolerance={"rel": 0.50},
        hardware_bound=True)
def quantize_seconds(ctx: CellContext) -> list[MetricResult]:
    return [MetricResult(ctx.quantize_seconds, {"threads": torch.get_num_threads(),
                                                "calibration": ctx.calibration})]
