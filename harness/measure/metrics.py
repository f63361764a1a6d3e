"""Quality and size metrics: perplexity, and against the unquantized reference KL divergence (mean,
percentiles, max), top-1 agreement (and its llama.cpp name, same top p), Δp and ln(PPL_q / PPL_ref),
all from one shared evaluation pass (:mod:`.evaluate`); bits per weight, weight bytes and quantization time.

The statistics against the reference follow llama.cpp's ``perplexity --kl-divergence``: per token
KL(P_ref || P_q) and Δp = p_q(target) − p_ref(target); percentiles by linear interpolation between
order statistics (numpy ``method="linear"``, llama.cpp's ``percentile``); stderrs treat tokens as
independent samples (they are not quite: neighbouring tokens share context), as llama.cpp does.

Each is registered here with its facts (:func:`.base.metric`); the other metrics are registered in
``tasks.py`` (accuracy), ``memory.py`` (KV bytes, peak memory), ``latency.py`` and ``energy.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...methods.base import linear_weight_count
from .base import METRICS, CellContext, MetricResult, MetricSpec, metric
from .evaluate import PERCENTILE_METHOD, mean_stderr, percentile

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
    # stderr: delta method on the per-token NLLs, ppl * std(nll) / sqrt(tokens) (the protocol is left as it was)
    return [MetricResult(s.perplexity, _eval_protocol(ctx), stderr=s.perplexity_stderr())]


def _needs_reference(ctx: CellContext, name: str) -> MetricResult | None:
    if ctx.reference is None:
        return MetricResult(None, _eval_protocol(ctx), status="unavailable",
                            error=f"{name} needs the unquantized reference, which this run did not build")
    return None


#: what every statistic against the reference says about the reference
REFERENCE = ("unquantized model, float32 forward; log-probs stored as uint16 per token (step = range / 65535, "
             "each within step/2), renormalized; target log-probs and top-1 exact")


def _ref_protocol(ctx: CellContext, **extra: Any) -> dict[str, Any]:
    return {**_eval_protocol(ctx), "reference": REFERENCE, **extra}


def _token_stats(ctx: CellContext) -> dict[str, np.ndarray]:
    """Per-token arrays of the shared pass, concatenated once per cell."""
    if "token_stats" not in ctx.memo:
        s = ctx.eval_stats()
        ctx.memo["token_stats"] = {"kl": s.token_kl(), "dp": s.token_delta_p(), "dnll": s.token_nll_diff()}
    return ctx.memo["token_stats"]


@metric("kl_divergence", label="KL", unit="nats/token", higher_is_better=False, order=1,
        tolerance={"rel": 0.10, "abs": 1e-4}, fmt=".4f", tag=eval_tag, needs_reference=True)
def kl_divergence(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "kl_divergence")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    # stderr: std(per-token KL) / sqrt(tokens)
    return [MetricResult(s.kl, _ref_protocol(ctx, direction="KL(P_fp || P_quant), mean per token"),
                         stderr=s.kl_stderr())]


@metric("top1_agreement", label="top-1", unit="fraction", higher_is_better=True, order=2,
        tolerance={"abs": 0.01}, fmt=".3f", tag=eval_tag, needs_reference=True)
def top1_agreement(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "top1_agreement")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    return [MetricResult(s.top1, _ref_protocol(ctx), stderr=s.top1_stderr())]


def _kl_percentile(name: str, q: float | None, doc: str) -> None:
    """Register ``name``: a percentile (or the max, ``q`` None) of the per-token KL(P_ref || P_q)."""

    def fn(ctx: CellContext) -> list[MetricResult]:
        missing = _needs_reference(ctx, name)
        if missing:
            return [missing]
        kl = _token_stats(ctx)["kl"]
        value = float(kl.max()) if q is None else percentile(kl, q)
        return [MetricResult(value, _ref_protocol(ctx, direction="KL(P_fp || P_quant) per token", statistic=doc,
                                                  interpolation=PERCENTILE_METHOD))]

    fn.__doc__ = f"The {doc} of the per-token KL divergence against the reference."
    metric(name, label=f"KL {doc}", unit="nats/token", higher_is_better=False, order=ORDERS[name],
           tolerance={"rel": 0.10, "abs": 1e-4} if q is not None and q < 99.5 else {"rel": 0.25, "abs": 1e-3},
           fmt=".4f", tag=eval_tag, needs_reference=True)(fn)


#: leaderboard order of the statistics against the reference (after the existing columns, which keep theirs)
ORDERS = {"ln_ppl_ratio": 12, "kl_median": 13, "kl_p90": 14, "kl_p99": 15, "kl_p999": 16, "kl_max": 17,
          "rms_delta_p": 18, "delta_p_p01": 19, "delta_p_p99": 20, "same_top_p": 21}

for _name, _q, _doc in (("kl_median", 50.0, "median"), ("kl_p90", 90.0, "90th percentile"),
                        ("kl_p99", 99.0, "99th percentile"), ("kl_p999", 99.9, "99.9th percentile"),
                        ("kl_max", None, "maximum")):
    _kl_percentile(_name, _q, _doc)


@metric("rms_delta_p", label="RMS Δp", unit="fraction", higher_is_better=False, order=ORDERS["rms_delta_p"],
        tolerance={"rel": 0.10, "abs": 1e-3}, fmt=".4f", tag=eval_tag, needs_reference=True)
def rms_delta_p(ctx: CellContext) -> list[MetricResult]:
    """sqrt(mean Δp²), Δp = p_q(target) − p_ref(target) per token (llama.cpp's "RMS Δp", as a fraction)."""
    missing = _needs_reference(ctx, "rms_delta_p")
    if missing:
        return [missing]
    dp = _token_stats(ctx)["dp"]
    rms = float(np.sqrt(np.mean(dp**2)))
    # llama.cpp's delta method: stderr(mean Δp²) / (2 RMS)
    stderr = mean_stderr(dp**2) / (2 * rms) if rms > 0 else None
    return [MetricResult(rms, _ref_protocol(ctx, statistic="sqrt(mean((p_q(target) - p_ref(target))^2))",
                                            stderr="delta method: std(dp^2) / sqrt(tokens) / (2 rms)"),
                         stderr=stderr)]


def _delta_p_percentile(name: str, q: float, higher_is_better: bool | None) -> None:
    def fn(ctx: CellContext) -> list[MetricResult]:
        missing = _needs_reference(ctx, name)
        if missing:
            return [missing]
        return [MetricResult(percentile(_token_stats(ctx)["dp"], q),
                             _ref_protocol(ctx, statistic=f"{q:g}th percentile of p_q(target) - p_ref(target)",
                                           interpolation=PERCENTILE_METHOD))]

    fn.__doc__ = f"The {q:g}th percentile of Δp = p_q(target) − p_ref(target) per token (a fraction)."
    metric(name, label=f"Δp p{q:g}", unit="fraction", higher_is_better=higher_is_better, order=ORDERS[name],
           tolerance={"abs": 0.01}, fmt=".4f", tag=eval_tag, needs_reference=True)(fn)


_delta_p_percentile("delta_p_p01", 1.0, True)  # the left tail: the target losing probability
_delta_p_percentile("delta_p_p99", 99.0, None)  # the right tail: a change either way


@metric("same_top_p", label="same top p", unit="fraction", higher_is_better=True, order=ORDERS["same_top_p"],
        tolerance={"abs": 0.01}, fmt=".3f", tag=eval_tag, needs_reference=True)
def same_top_p(ctx: CellContext) -> list[MetricResult]:
    """llama.cpp's "Same top p": the fraction of positions where the quantized model's most probable token
    is the reference's (``imax == imax_base`` in its perplexity tool): top-1 agreement itself. An alias
    record of :func:`top1_agreement` (the same value from the same pass, ``alias_of`` in its protocol)."""
    missing = _needs_reference(ctx, "same_top_p")
    if missing:
        return [missing]
    (r,) = top1_agreement(ctx)
    return [MetricResult(r.value, {**r.protocol, "alias_of": "top1_agreement"}, stderr=r.stderr)]


@metric("ln_ppl_ratio", label="ln(PPL/PPL_fp)", unit="nats/token", higher_is_better=False,
        order=ORDERS["ln_ppl_ratio"], tolerance={"abs": 0.002}, fmt=".4f", tag=eval_tag, needs_reference=True)
def ln_ppl_ratio(ctx: CellContext) -> list[MetricResult]:
    """mean(nll_q − nll_ref) = ln(PPL_q / PPL_ref), with the paired stderr std(nll_q − nll_ref) / sqrt(n)."""
    missing = _needs_reference(ctx, "ln_ppl_ratio")
    if missing:
        return [missing]
    d = _token_stats(ctx)["dnll"]
    return [MetricResult(float(d.mean()), _ref_protocol(
        ctx, statistic="mean(nll_q - nll_ref) = ln(PPL_q / PPL_ref)", paired="over the same tokens",
        stderr="std(nll_q - nll_ref, ddof=1) / sqrt(tokens)"), stderr=mean_stderr(d))]


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
