"""Synthetic records in the schema of harness/records.py, for report/compare/HTML tests."""

from __future__ import annotations

from typing import Any

from quantbench.harness.measure import METRICS
from quantbench.harness.run.records import make_record

PPL_PROTO = {"name": "gptq", "dataset": "wiki", "split": "test", "seq_len": 64, "windows": 2, "tokens": 126,
             "text_sha256": "abc"}


def hardware(cpu: str = "AMD EPYC", threads: int = 2) -> dict[str, Any]:
    return {"git_sha": "deadbeef" * 5, "dirty": False, "versions": {"torch": "2.13.0+cpu", "quantbench": "0.1.0"},
            "hardware": {"cpu": cpu, "cores": 2, "gpu": None}, "threads": threads, "hostname": "vm", "seed": 0,
            "started": "2026-01-01T00:00:00Z", "seconds": 1.0}


def rec(cell: str, metric: str, value: float | None, *, model: str = "tiny-llama", method: str | None = None,
        config: Any = None, protocol: dict[str, Any] | None = None, status: str = "ok", run_id: str = "run",
        suite: str = "t", prov: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    method = method or cell.split("-")[0]
    if config is None:
        config = {"method": method, "version": 1}
    if protocol is None:
        if metric in ("perplexity", "kl_divergence", "top1_agreement"):
            protocol = dict(PPL_PROTO)
        elif metric == "accuracy":
            protocol = {"task": "mmlu", "shots": 0}
        elif metric == "decode_ms_per_token":
            protocol = {"context": 128, "batch": 1, "p90": (value or 0) * 1.1}
        else:
            protocol = {}
    spec = METRICS.get(metric) if metric in METRICS else None  # unit and direction as the runner writes them
    return make_record(run_id=run_id, suite=suite, cell=cell, model={"name": model, "source": "test"},
                       method=method, method_config=config, metric=metric, value=value,
                       unit=spec.unit if spec else "u", higher_is_better=spec.higher_is_better if spec else None,
                       protocol=protocol, status=status,
                       error=error if error is not None or status == "ok" else "boom",
                       provenance=prov or hardware())


def cell(name: str, values: dict[str, float | None], **kw: Any) -> list[dict[str, Any]]:
    return [rec(name, m, v, **kw) for m, v in values.items()]
