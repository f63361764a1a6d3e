"""JSONL records (one per cell x metric) with provenance, written and fsynced per cell; resume state."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import subprocess
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..paths import REPO_ROOT

log = logging.getLogger(__name__)

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
    """Appends records to a JSONL file; ``write_cell`` writes a cell's records at once and fsyncs.

    Before its first append the writer restores a torn tail (:meth:`repair`), so a record written
    after a crash never lands on the fragment of the record the crash cut."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repaired = False

    def repair(self, expected: Mapping[tuple[str, str], Collection[str]] | None = None) -> Path | None:
        """Restore the file's tail if a crash cut its last write; returns the side file or None.

        A last line without its newline is either a complete record (only the newline was lost:
        the newline is restored) or a fragment. A fragment and the complete records of the same
        cell attempt before it (one ``write_cell`` call) are moved to ``<name>.torn-<n>`` and the
        file is truncated to the end of the last complete attempt, so the cell reruns whole and
        no (cell, metric) is recorded twice. With ``expected`` ((model, cell) -> its metrics), a
        last attempt that holds only some of its cell's metrics (a write cut at a line's end) is
        moved aside the same way. Idempotent."""
        self._repaired = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not data:
            return None
        cut = data.rfind(b"\n") + 1  # 0 when the fragment is the file's only line
        fragment = data[cut:]
        if fragment:
            try:
                json.loads(fragment)
            except ValueError:
                return self._move_tail(data, _torn_attempt_start(data[:cut], fragment),
                                       f"a {len(fragment)}-byte fragment")
            with open(self.path, "ab") as f:  # a whole record, only its newline lost
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("%s: restored the newline lost after the last record", self.path)
            data += b"\n"
        if expected:
            start = _torn_attempt_start(data, b"")
            tail = [json.loads(line) for line in data[start:].splitlines()]
            if tail:
                key = (str((tail[0].get("model") or {}).get("name")), str(tail[0].get("cell")))
                missing = set(expected.get(key, ())) - {r.get("metric") for r in tail}
                if missing:
                    return self._move_tail(data, start, f"no record of {', '.join(sorted(missing))}")
        return None

    def _move_tail(self, data: bytes, start: int, what: str) -> Path:
        """Move ``data[start:]`` (the cut last attempt) to a side file and truncate the file to ``start``."""
        side = self._side_file()
        with open(side, "wb") as f:
            f.write(data[start:])
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
        n_complete = data[start:].count(b"\n")
        log.warning("%s: the last write was cut by a crash; dropped %d byte(s) (%d complete record(s) of that "
                    "cell attempt, %s), kept in %s; the cell reruns", self.path, len(data) - start, n_complete,
                    what, side)
        return side

    def _side_file(self) -> Path:
        n = 1
        while (side := self.path.with_name(f"{self.path.name}.torn-{n}")).exists():
            n += 1
        return side

    def write_cell(self, records: Iterable[dict[str, Any]]) -> None:
        if not self._repaired:
            self.repair()
        data = "".join(json.dumps(r, sort_keys=False, allow_nan=True) + "\n" for r in records).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


_CELL_RE = re.compile(r'"cell": ("(?:[^"\\]|\\.)*")')
_MODEL_RE = re.compile(r'"model": \{"name": ("(?:[^"\\]|\\.)*")')


def _attempt(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What the records of one cell attempt (one ``write_cell``) share: model, cell and provenance."""
    p = rec.get("provenance") or {}
    return (rec.get("run_id"), (rec.get("model") or {}).get("name"), rec.get("cell"), p.get("started"),
            p.get("seconds"))


def _torn_attempt_start(complete: bytes, fragment: bytes) -> int:
    """Offset in ``complete`` (whole lines) where the attempt the torn ``fragment`` belongs to begins.

    The fragment's cell (and model), when it got that far, tells whether the complete lines just
    before it are of the same attempt; when it did not, they are taken as such (at worst one
    complete cell is moved aside and reruns: nothing is lost)."""
    lines = complete.splitlines(keepends=True)
    if not lines:
        return 0
    try:
        last = json.loads(lines[-1])
    except ValueError:
        return len(complete)
    text = fragment.decode("utf-8", errors="replace")
    for rx, value in ((_CELL_RE, last.get("cell")), (_MODEL_RE, (last.get("model") or {}).get("name"))):
        m = rx.search(text)
        if m is None:
            break
        try:
            if json.loads(m.group(1)) != value:
                return len(complete)  # the fragment began a new attempt: the lines before it are whole
        except ValueError:
            break
    key, start = _attempt(last), len(complete)
    for line in reversed(lines):
        try:
            if _attempt(json.loads(line)) != key:
                break
        except ValueError:
            break
        start -= len(line)
    return start


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


def completed_cells(
    records: Iterable[dict[str, Any]],
    expected: Mapping[tuple[str, str], tuple[Collection[str], str | None]] | None = None,
) -> set[tuple[str, str]]:
    """(model name, cell) pairs that need no rerun.

    ``expected`` maps each (model name, cell) of the suite to its metrics and its definition hash
    (``provenance.cell_definition``; None: not checked): such a cell is done when every one of its
    metrics has records, the last attempt's records of each metric (the last record of a (cell,
    metric) wins) are all ``ok`` or ``unavailable`` (a failed metric reruns its cell) and none of them
    was measured under another definition. Without ``expected``: every recorded metric ok."""
    latest: dict[tuple[Any, Any, Any], tuple[tuple[Any, ...], list[dict[str, Any]]]] = {}
    for r in records:
        key = ((r.get("model") or {}).get("name"), r.get("cell"), r.get("metric"))
        attempt = _attempt(r)
        prev = latest.get(key)
        if prev is not None and prev[0] == attempt:
            prev[1].append(r)  # one metric, several records (one per task): same attempt
        else:
            latest[key] = (attempt, [r])
    ok = {k: all(r.get("status") in ("ok", "unavailable") for r in recs) for k, (_, recs) in latest.items()}
    if expected is None:
        cells: dict[tuple[str, str], bool] = {}
        for (model, cell, _), good in ok.items():
            cells[(model, cell)] = cells.get((model, cell), True) and good
        return {k for k, good in cells.items() if good}
    done = set()
    for (model, cell), (metrics, definition) in expected.items():
        keys = [(model, cell, m) for m in metrics]
        if not all(ok.get(k) for k in keys):
            continue
        if definition is not None and any(
                (r.get("provenance") or {}).get("cell_definition", definition) != definition
                for k in keys for r in latest[k][1]):
            continue
        done.add((model, cell))
    return done
