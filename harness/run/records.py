"""JSONL records (one per cell x metric) with provenance, written and flushed per cell."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..paths import REPO_ROOT

SCHEMA = 1
VOLATILE_PROVENANCE = ("git_sha", "dirty", "started", "seconds", "metric_seconds", "hostname")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_state(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    cwd = cwd or REPO_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                            capture_output=True, text=True, check=True)
        return sha.stdout.strip(), bool(st.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine()}
    try:
        hw["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_count"] = torch.cuda.device_count()
    else:
        hw["gpu"] = None
    return hw


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("quantbench", "torch", "transformers", "gguf", "numpy", "lm-eval", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def environment() -> dict[str, Any]:
    """Run-level provenance (written to env.json and copied into every record)."""
    import torch

    sha, dirty = git_state()
    return {"git_sha": sha, "dirty": dirty, "versions": versions(), "hardware": hardware(),
            "threads": torch.get_num_threads(), "hostname": platform.node()}


def make_record(
    *, run_id: str, suite: str, cell: str, model: dict[str, Any], method: str, method_config: Any,
    metric: str, value: float | None, unit: str, higher_is_better: bool | None,
    protocol: dict[str, Any] | None = None, stderr: float | None = None, status: str = "ok",
    error: str | None = None, provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "run_id": run_id, "suite": suite, "cell": cell, "model": model,
        "method": method, "method_config": method_config, "metric": metric,
        "value": value, "unit": unit, "higher_is_better": higher_is_better,
        "protocol": protocol or {}, "stderr": stderr, "status": status, "error": error,
        "provenance": provenance or {},
    }


class RecordWriter:
    """Appends records to a JSONL file; ``write_cell`` flushes and fsyncs once per cell."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_cell(self, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, sort_keys=False, allow_nan=True) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a crash is skipped)."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def completed_cells(records: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """(model name, cell) pairs whose every record is ok or unavailable (failed cells rerun)."""
    latest: dict[tuple[str, str, str], bool] = {}
    for r in records:  # the last record of a (cell, metric) wins: a rerun replaces a failure
        latest[(r["model"]["name"], r["cell"], r["metric"])] = r["status"] in ("ok", "unavailable")
    cells: dict[tuple[str, str], bool] = {}
    for (model, cell, _), ok in latest.items():
        cells[(model, cell)] = cells.get((model, cell), True) and ok
    return {k for k, ok in cells.items() if ok}
