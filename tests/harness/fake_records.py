"""Synthetic records in the schema of harness/records.py, for report/compare/HTML tests."""

from __future__ import annotations

from typing import Any

from quantbench.harness.measure import METRICS
from quantbench.harness.run.records import make_record

PPL_PROTO = {"name": "gptq", "dataset": "wiki", "split": "test", "seq_len": 64, "windows": 2, "tokens": 126,
             "text_sha256": "abc"}


#: the per-token metrics vs the reference the measure side records beside perplexity (same protocol);
#: ``ln_ppl_ratio``: value = mean per-token NLL difference vs the reference, stderr = its paired stderr
PAIRED_METRICS = ("kl_median", "kl_p90", "kl_p99", "kl_p999", "kl_max", "rms_delta_p", "delta_p_p01", "delta_p_p99",
                  "same_top_p", "ln_ppl_ratio")


def hardware(cpu: str = "AMD EPYC", threads: int = 2) -> dict[str, Any]:
    return {"git_sha": "deadbeef" * 5, "dirty": False, "versions": {"torch": "2.13.0+cpu", "quantbench": "0.1.0"},
            "hardware": {"cpu": cpu, "cores": 2, "gpu": None}, "threads": threads, "hostname": "vm", "seed": 0,
            "started": "2026-01-01T00:00:00Z", "seconds": 1.0}


def rec(cell: str, metric: str, value: float | None, *, model: str = "tiny-llama", method: str | None = None,
        config: Any = None, protocol: dict[str, Any] | None = None, status: str = "ok", run_id: str = "run",
        suite: str = "t", prov: dict[str, Any] | None = None, error: str | None = None,
        stderr: float | None = None, samples: list[float] | None = None,
        model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One record as the runner writes it; ``samples``: accuracy's per-example scores (top-level key);
    ``model_info``: extra ``model`` keys (``source_precision``, ``dtype``)."""
    method = method or cell.split("-")[0]
    if config is None:
        config = {"method": method, "version": 1}
    if protocol is None:
        if metric in ("perplexity", "kl_divergence", "top1_agreement", *PAIRED_METRICS):
            protocol = dict(PPL_PROTO)
        elif metric == "accuracy":
            protocol = {"task": "mmlu", "shots": 0}
        elif metric == "decode_ms_per_token":
            protocol = {"context": 128, "batch": 1, "p90": (value or 0) * 1.1}
        else:
            protocol = {}
    spec = METRICS.get(metric) if metric in METRICS else None  # unit and direction as the runner writes them
    r = make_record(run_id=run_id, suite=suite, cell=cell,
                    model={"name": model, "source": "test", **(model_info or {})}, method=method,
                    method_config=config, metric=metric, value=value,
                    unit=spec.unit if spec else "u", higher_is_better=spec.higher_is_better if spec else None,
                    protocol=protocol, status=status, stderr=stderr,
                    error=error if error is not None or status == "ok" else "boom",
                    provenance=prov or hardware())
    if samples is not None:
        r["samples"] = list(samples)
    return r


def cell(name: str, values: dict[str, float | None], **kw: Any) -> list[dict[str, Any]]:
    return [rec(name, m, v, **kw) for m, v in values.items()]


def paired_cell(name: str, ppl: float, ppl_stderr: float, ln_ratio: float, ln_ratio_stderr: float,
                acc_samples: list[float] | None = None, task: str = "mmlu", **kw: Any) -> list[dict[str, Any]]:
    """A cell with the measure side's new records: perplexity with a stderr, the per-token quantiles, the
    paired ``ln_ppl_ratio`` and (``acc_samples``) an accuracy record with per-example ``samples``."""
    out = [rec(name, "perplexity", ppl, stderr=ppl_stderr, **kw),
           rec(name, "ln_ppl_ratio", ln_ratio, stderr=ln_ratio_stderr, **kw)]
    for i, m in enumerate(PAIRED_METRICS[:-1]):
        out.append(rec(name, m, 0.01 * (i + 1), **kw))
    if acc_samples is not None:
        n = len(acc_samples)
        mean = sum(acc_samples) / n
        se = (sum((x - mean) ** 2 for x in acc_samples) / (n - 1) / n) ** 0.5
        out.append(rec(name, "accuracy", mean, stderr=se, samples=acc_samples,
                       protocol={"task": task, "shots": 0, "n": n}, **kw))
    return out
