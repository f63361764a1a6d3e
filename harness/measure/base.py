"""Metric specs and results, the cell context, and the registries of metrics and their suite blocks.

A metric is registered once, in the module that measures it, by the :func:`metric` decorator with
all its facts (:class:`MetricSpec`): the runner writes ``unit`` and ``higher_is_better`` into every
record, the leaderboard reads ``label``, ``order``, ``scale``, ``fmt`` and ``tag``, and the CI gate
(``quantbench compare``) reads ``tolerance`` and ``hardware_bound``.

A suite block a metric reads (``latency:``, ``tasks:``) is a frozen dataclass registered in
:data:`PARAM_BLOCKS` under its suite key, next to its metrics; its classmethod ``parse(where, *layers)``
validates the suite's entry then the cell's (a later layer overrides) and raises ConfigError with a
did-you-mean hint.  The metric names the block it reads in ``MetricSpec.params``.

This module imports no metric module (only the evaluation library ``evaluate.py``);
``harness/measure/__init__.py`` imports them all, so both registries are complete once any part of
the package is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ...methods.base import ConfigError, Method, did_you_mean, model_storage
from ...methods.registry import Registry
from ..inputs.models import LoadedModel
from .evaluate import EvalData, EvalStats, Reference, evaluate

TOLERANCE_KINDS = ("rel", "abs", "recovery")


def check_tolerance(where: str, spec: Any) -> dict[str, float]:
    """A tolerance ``{rel|abs|recovery: value}`` as floats; ConfigError when malformed.

    ``rel`` / ``abs``: the value may be worse than the baseline by ``max(rel * |baseline|, abs)``;
    ``recovery``: at least this fraction of the same run's fp row.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of {sorted(TOLERANCE_KINDS)}, got {spec!r}")
    for k, v in spec.items():
        if k not in TOLERANCE_KINDS:
            raise ConfigError(f"{where}: unknown key '{k}'{did_you_mean(str(k), TOLERANCE_KINDS)}")
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or abs(v) > 1e300 or not math.isfinite(v)
                or v < 0 or (k == "recovery" and v > 1)):
            raise ConfigError(f"{where}.{k}: expected a number >= 0 (recovery <= 1), got {v!r}")
    return {k: float(v) for k, v in spec.items()}


@dataclass
class MetricResult:
    value: float | None
    protocol: dict[str, Any] = field(default_factory=dict)
    stderr: float | None = None
    status: str = "ok"
    error: str | None = None
    samples: list[float] | None = None  # per-example scores (accuracy), written as the record's "samples"


@dataclass(frozen=True)
class MetricSpec:
    """Everything known about a metric, declared where it is measured."""

    name: str  # the fixed record name (DESIGN.md)
    fn: Callable[[CellContext], list[MetricResult]]  # measures one cell
    unit: str
    higher_is_better: bool | None  # None: no direction (both ways count as a change)
    label: str  # leaderboard column label (the protocol tag is appended in brackets)
    order: int  # leaderboard column position
    tolerance: dict[str, float]  # default CI tolerance (TOLERANCE_KINDS); a suite's entry replaces it
    hardware_bound: bool = False  # compared only between records of the same hardware fingerprint
    params: str | None = None  # the suite block it reads (a key of PARAM_BLOCKS)
    scale: float = 1.0  # leaderboard value = record value x scale (bytes -> MB)
    fmt: str | None = None  # leaderboard number format (default: 3 significant-ish digits)
    tag: Callable[[dict[str, Any]], str] | None = None  # protocol -> the tag that makes values comparable
    needs_reference: bool = False  # reads the unquantized reference store (the runner builds it once per model)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerance", check_tolerance(f"metric {self.name}: tolerance", self.tolerance))

    def compute(self, ctx: CellContext) -> list[MetricResult]:
        return self.fn(ctx)

    def protocol_tag(self, protocol: dict[str, Any]) -> str:
        return self.tag(protocol) if self.tag else ""


#: every metric, by name; registered by :func:`metric` in the module that measures it
METRICS: Registry[MetricSpec] = Registry("metric")
#: the suite blocks metrics read, by suite key (``latency``, ``tasks``): classes with ``parse(where, *layers)``
PARAM_BLOCKS: Registry[Any] = Registry("metric parameter block")


def metric(name: str, **facts: Any) -> Callable[[Callable[[CellContext], list[MetricResult]]],
                                                  Callable[[CellContext], list[MetricResult]]]:
    """Decorator: register the function as metric ``name`` with its :class:`MetricSpec` facts."""

    def deco(fn: Callable[[CellContext], list[MetricResult]]) -> Callable[[CellContext], list[MetricResult]]:
        METRICS.add(name, MetricSpec(name, fn, **facts))
        return fn

    return deco


@dataclass
class CellContext:
    """What a metric gets: the cell's quantized model and what its measurements read (no suite types)."""

    cell: str  # the cell's name
    model: nn.Module
    base: LoadedModel
    eval_data: EvalData
    reference: Reference | None
    methods: list[Method]  # the chain, as applied
    quantize_seconds: float
    seed: int
    calibration: dict[str, Any] = field(default_factory=dict)  # the cell's calibration spec
    params: dict[str, Any] = field(default_factory=dict)  # parsed suite blocks by key (see cell_params)
    limit: int | None = None
    memo: dict[str, Any] = field(default_factory=dict)
    artifact_dir: Path | None = None  # the cell's directory in the run (None: the run has none)

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def kv_method(self) -> Method | None:
        """The first method of the chain that quantizes the KV cache (it owns the cache), or None."""
        return next((m for m in self.methods if m.quantizes("kv")), None)

    def storage(self) -> dict[str, Any]:
        """``model_storage`` of the cell's model, computed once (bits_per_weight and weight_bytes share it)."""
        if "storage" not in self.memo:
            self.memo["storage"] = model_storage(self.model)
        return self.memo["storage"]

    def eval_stats(self) -> EvalStats:
        """One evaluation pass shared by perplexity and every statistic against the reference (and peak memory)."""
        if "eval" not in self.memo:
            self.memo["eval"] = evaluate(self.model, self.eval_data, self.reference, desc=self.cell)
        return self.memo["eval"]


def cell_params(suite: Any, cell: Any) -> dict[str, Any]:
    """Every registered suite block, parsed for one cell: the suite's entry (attribute ``suite.<key>``,
    None when absent) overridden by the cell's (``cell.<key>``)."""
    where = f"cell {getattr(cell, 'name', '?')}"
    return {key: block.parse(where, getattr(suite, key, None), getattr(cell, key, None))
            for key, block in PARAM_BLOCKS.items()}


def validate_tolerances(tol: dict[str, Any], where: str = "tolerances") -> dict[str, dict[str, float]]:
    """A ``tolerances:`` block (a suite's, or a file given to compare) checked against the metrics and the kinds."""
    known = METRICS.names()
    out: dict[str, dict[str, float]] = {}
    for metric, spec in tol.items():
        if metric not in known:
            raise ConfigError(f"{where}: unknown metric '{metric}'{did_you_mean(str(metric), known)}")
        out[str(metric)] = check_tolerance(f"{where}.{metric}", spec)
    return out
