"""Metrics: fixed names (DESIGN.md), each a function of the cell context returning results.

A metric is registered in :data:`METRICS` as ``name -> MetricSpec(unit, higher_is_better,
"module:function")``; the function is imported lazily and called as ``fn(ctx)``, returning a
list of :class:`MetricResult` (usually one; one per task for ``accuracy``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .evaluate import EvalData, EvalStats, Reference
    from ..inputs.models import LoadedModel
    from ..run.suite import Cell, Suite
    from ...methods.base import Method


@dataclass
class MetricResult:
    value: float | None
    protocol: dict[str, Any] = field(default_factory=dict)
    stderr: float | None = None
    status: str = "ok"
    error: str | None = None


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    higher_is_better: bool | None
    target: str  # "module:function"

    def compute(self, ctx: CellContext) -> list[MetricResult]:
        mod, fn = self.target.split(":")
        return getattr(importlib.import_module(mod), fn)(ctx)


@dataclass
class CellContext:
    suite: Suite
    cell: Cell
    model: nn.Module
    base: LoadedModel
    eval_data: EvalData
    reference: Reference | None
    methods: list[Method]
    quantize_seconds: float
    seed: int
    run_dir: Path | None = None
    limit: int | None = None
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    def storage(self) -> dict[str, Any]:
        """``model_storage`` of the cell's model, computed once (bits_per_weight and weight_bytes share it)."""
        if "storage" not in self.memo:
            from ...methods.base import model_storage

            self.memo["storage"] = model_storage(self.model)
        return self.memo["storage"]

    def eval_stats(self) -> EvalStats:
        """One evaluation pass shared by perplexity, kl_divergence and top1_agreement."""
        if "eval" not in self.memo:
            from .evaluate import evaluate

            self.memo["eval"] = evaluate(self.model, self.eval_data, self.reference, desc=self.cell.name)
        return self.memo["eval"]


_Q = "quantbench.harness.measure.metrics"
METRICS: dict[str, MetricSpec] = {
    "perplexity": MetricSpec("ppl", False, f"{_Q}:perplexity"),
    "kl_divergence": MetricSpec("nats/token", False, f"{_Q}:kl_divergence"),
    "top1_agreement": MetricSpec("fraction", True, f"{_Q}:top1_agreement"),
    "bits_per_weight": MetricSpec("bits", False, f"{_Q}:bits_per_weight"),
    "weight_bytes": MetricSpec("bytes", False, f"{_Q}:weight_bytes"),
    "quantize_seconds": MetricSpec("s", False, f"{_Q}:quantize_seconds"),
    "accuracy": MetricSpec("fraction", True, "quantbench.harness.measure.tasks:accuracy"),
    "kv_bytes_per_token": MetricSpec("bytes", False, "quantbench.harness.measure.memory:kv_bytes_per_token"),
    "prefill_tokens_per_s": MetricSpec("tokens/s", True, "quantbench.harness.measure.latency:prefill_tokens_per_s"),
    "decode_ms_per_token": MetricSpec("ms", False, "quantbench.harness.measure.latency:decode_ms_per_token"),
    "peak_memory_bytes": MetricSpec("bytes", False, "quantbench.harness.measure.memory:peak_memory_bytes"),
    "energy_j_per_token": MetricSpec("J/token", False, "quantbench.harness.measure.energy:energy_j_per_token"),
}


def _eval_protocol(ctx: CellContext) -> dict[str, Any]:
    return dict(ctx.eval_data.protocol)


def perplexity(ctx: CellContext) -> list[MetricResult]:
    s = ctx.eval_stats()
    return [MetricResult(s.perplexity, _eval_protocol(ctx), stderr=s.perplexity_stderr())]


def _needs_reference(ctx: CellContext, name: str) -> MetricResult | None:
    if ctx.reference is None:
        return MetricResult(None, _eval_protocol(ctx), status="unavailable",
                            error=f"{name} needs the unquantized reference, which this run did not build")
    return None


def kl_divergence(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "kl_divergence")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    return [MetricResult(s.kl, {**_eval_protocol(ctx), "reference": "unquantized model, float32",
                                "direction": "KL(P_fp || P_quant), mean per token"})]


def top1_agreement(ctx: CellContext) -> list[MetricResult]:
    missing = _needs_reference(ctx, "top1_agreement")
    if missing:
        return [missing]
    s = ctx.eval_stats()
    return [MetricResult(s.top1, {**_eval_protocol(ctx), "reference": "unquantized model, float32"})]


def bits_per_weight(ctx: CellContext) -> list[MetricResult]:
    from ...methods.base import linear_weight_count

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


def weight_bytes(ctx: CellContext) -> list[MetricResult]:

    st = ctx.storage()
    t = st["total"]
    return [MetricResult(
        float(t.total),
        {"packed_weights": t.packed_weights, "scales_zeros": t.scales_zeros, "outliers": t.outliers,
         "unquantized": t.unquantized, "linear_total": st["linear"].total, "other_total": st["other"].total},
    )]


def quantize_seconds(ctx: CellContext) -> list[MetricResult]:
    import torch

    return [MetricResult(ctx.quantize_seconds, {"threads": torch.get_num_threads(),
                                                "calibration": ctx.cell.calibration})]
