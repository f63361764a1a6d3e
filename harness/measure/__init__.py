"""Measurements.  Each module registers its metrics, with their facts, and the suite blocks they read
in :mod:`.base`'s registries (:data:`METRICS`, :data:`PARAM_BLOCKS`); importing the package imports
every one of them, so the registries are complete wherever a metric is looked up."""

from . import energy, latency, memory, metrics, tasks
from .base import METRICS, PARAM_BLOCKS, CellContext, MetricResult, MetricSpec, cell_params, metric

__all__ = ["METRICS", "PARAM_BLOCKS", "CellContext", "MetricResult", "MetricSpec", "cell_params", "metric",
           "energy", "latency", "memory", "metrics", "tasks"]
