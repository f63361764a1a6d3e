"""The local, sequential executor: models x cells -> records.jsonl, one flush per cell.

For each model: load the base model once, tokenize the evaluation split, build (or reuse) the
unquantized reference log-probs, then for each cell: fresh deep copy -> calibration -> method
chain -> metrics -> records.  A failing cell is recorded with ``status: failed`` and the run goes
on; Ctrl-C keeps every finished cell; ``resume`` skips cells already recorded.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...methods.base import Calibration, Method
from ...methods.quantize import quantize
from ..inputs import data as datamod
from ..inputs.models import LoadedModel, load_model, model_key
from ..measure import METRICS, CellContext, MetricResult, cell_params, memory
from ..measure.evaluate import EvalData, Reference, build_eval_data
from ..paths import REPO_ROOT
from .records import (
    RecordWriter,
    completed_cells,
    environment,
    make_record,
    read_records,
    utc_now,
)
from .suite import CalibrationSpec, Cell, Suite, resolved_yaml

log = logging.getLogger(__name__)



def default_run_dir(suite: Suite) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return REPO_ROOT / "results" / "runs" / f"{stamp}-{suite.name}"


class CellRunner:
    """Everything needed to run the cells of one model (shared by the local and Ray executors)."""

    def __init__(self, suite: Suite, model_spec: Any, run_dir: Path | None, seed: int,
                 limit: int | None = None, loaded: LoadedModel | None = None) -> None:
        self.suite, self.model_spec, self.run_dir, self.seed, self.limit = suite, model_spec, run_dir, seed, limit
        self.base = loaded or load_model(model_spec)
        self.base.model.eval()
        self._calib: dict[tuple, Calibration] = {}
        self.eval_data = self._eval_data()
        self.reference: Reference | None = None
        if any(m in ("kl_divergence", "top1_agreement") for c in suite.cells for m in c.metrics):
            self.reference = self._reference()

    def _eval_data(self) -> EvalData:
        ev = self.suite.eval
        ids = datamod.tokens(ev.dataset, "test", self.base.tokenizer)
        max_windows = ev.max_windows
        if self.limit is not None:
            max_windows = min(max_windows or self.limit, self.limit)
        return build_eval_data(ids, ev.dataset, ev.protocol, ev.seq_len, ev.stride, max_windows)

    def _reference(self) -> Reference:
        key = Reference.key(self.base.info, self.eval_data)
        path = datamod.cache_dir() / "reference" / f"{key}.npy"
        if path.exists():
            try:
                import numpy as np

                vocab = int(np.load(path, mmap_mode="r").shape[1])
                return Reference(path, self.eval_data, vocab)
            except (ValueError, OSError):
                path.unlink()
        log.info("building the unquantized reference on %d windows", len(self.eval_data.windows))
        ref, _ = Reference.build(self.base.model, self.eval_data, path)
        return ref

    def calibration(self, spec: CalibrationSpec) -> Calibration:
        key = (spec.dataset, spec.n_samples, spec.seq_len, self.seed)
        if key not in self._calib:
            self._calib[key] = datamod.calibration(spec.to_dict(), self.base.tokenizer, self.seed)
        return self._calib[key]

    def run_cell(self, cell: Cell, run_id: str, env: dict[str, Any]) -> list[dict[str, Any]]:
        """Quantize a fresh copy and measure; never raises for a failing cell (returns failed records)."""
        started, t0 = utc_now(), time.perf_counter()
        methods: list[Method] = []
        metric_seconds: dict[str, float] = {}
        model = None
        try:
            memory.reset_peak()
            model = copy.deepcopy(self.base.model)
            tq = time.perf_counter()
            model, methods = quantize(model, [(s.method, s.params) for s in cell.chain],
                                      lambda: self.calibration(cell.calibration), self.seed,
                                      self._cell_dir(cell) if self.run_dir else None)
            quantize_seconds = time.perf_counter() - tq
            peak_quantize = memory.peak()
            memory.reset_peak()
            model.eval()
            ctx = CellContext(cell.name, model, self.base, self.eval_data, self.reference, methods,
                              quantize_seconds, self.seed, cell.calibration.to_dict(),
                              cell_params(self.suite, cell), self.limit)
            ctx.memo["peak_quantize"] = peak_quantize
            results = []
            for name in cell.metrics:
                tm = time.perf_counter()
                results.append((name, self._measure(name, ctx)))
                metric_seconds[name] = round(time.perf_counter() - tm, 3)  # shared work counts once, first
            self._save_artifacts(cell, methods)
        except Exception as e:  # a failing cell is recorded, the run goes on
            log.error("cell %s failed: %s", cell.name, e)
            log.debug("%s", traceback.format_exc())
            err = f"{type(e).__name__}: {e}"
            results = [(name, [MetricResult(None, status="failed", error=err)]) for name in cell.metrics]
        finally:
            del model
            gc.collect()
        prov = {**env, "seed": self.seed, "started": started, "seconds": round(time.perf_counter() - t0, 3),
                "metric_seconds": metric_seconds}
        log.info("cell %s: %.1f s (%s)", cell.name, prov["seconds"],
                 ", ".join(f"{k} {v:.1f}" for k, v in metric_seconds.items()))
        return self._records(cell, methods, results, run_id, prov)

    def _measure(self, name: str, ctx: CellContext) -> list[MetricResult]:
        try:
            res = METRICS[name].compute(ctx)
        except Exception as e:
            log.error("metric %s of %s failed: %s", name, ctx.cell, e)
            log.debug("%s", traceback.format_exc())
            return [MetricResult(None, status="failed", error=f"{type(e).__name__}: {e}")]
        for r in res:
            if r.status == "ok" and (r.value is None or (isinstance(r.value, float) and not math.isfinite(r.value))):
                r.status, r.error = "failed", f"non-finite value {r.value}"
                r.value = None
        return res

    def _records(self, cell: Cell, methods: list[Method], results: list[tuple[str, list[MetricResult]]],
                 run_id: str, prov: dict[str, Any]) -> list[dict[str, Any]]:
        configs = [s.config_dict() for s in cell.chain]
        method_config: Any = configs[0] if len(configs) == 1 else configs
        out = []
        for name, res in results:
            spec = METRICS[name]
            for r in res:
                out.append(make_record(
                    run_id=run_id, suite=self.suite.name, cell=cell.name, model=self._model_info(),
                    method=cell.method_label, method_config=method_config, metric=name, value=r.value,
                    unit=spec.unit, higher_is_better=spec.higher_is_better, protocol=r.protocol,
                    stderr=r.stderr, status=r.status, error=r.error, provenance=prov,
                ))
        return out

    def _cell_dir(self, cell: Cell) -> Path:
        """Per model and cell: a method's checkpoints must never be resumed by another model's cell."""
        assert self.run_dir is not None
        return self.run_dir / "cells" / _safe(model_key(self.model_spec)) / _safe(cell.name)

    def _model_info(self) -> dict[str, Any]:
        i = self.base.info
        return {k: i.get(k) for k in ("name", "source", "sha256", "params", "source_precision", "dtype")}

    def _save_artifacts(self, cell: Cell, methods: list[Method]) -> None:
        if self.run_dir is None:
            return
        arts = {m.name: m.artifacts for m in methods if m.artifacts}
        if arts:
            d = self._cell_dir(cell)
            d.mkdir(parents=True, exist_ok=True)
            (d / "artifacts.json").write_text(json.dumps(arts, indent=1, default=str))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


@dataclass
class RunState:
    dir: Path
    env: dict[str, Any]
    done: set[tuple[str, str]]
    run_id: str
    writer: RecordWriter


def start_run(suite: Suite, out: Path | None, resume: bool) -> RunState:
    """Create (or, with ``resume``, reopen) a run directory; shared by every executor."""
    run_dir = Path(out) if out else default_run_dir(suite)
    records_path = run_dir / "records.jsonl"
    if records_path.exists() and not resume:
        raise FileExistsError(f"{records_path} exists; pass --resume to continue that run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "suite.resolved.yaml").write_text(resolved_yaml(suite))
    env = environment()
    (run_dir / "env.json").write_text(json.dumps(env, indent=1))
    existing = read_records(records_path)
    run_id = existing[0]["run_id"] if existing else run_dir.name
    return RunState(run_dir, env, completed_cells(existing), run_id, RecordWriter(records_path))


def run_suite(
    suite: Suite,
    out: Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    limit: int | None = None,
    cell_filter: Callable[[Cell], bool] | None = None,
) -> Path:
    """Run every pending cell of ``suite`` locally; returns the run directory."""
    run = start_run(suite, out, resume)
    run_dir, env, done, run_id, writer = run.dir, run.env, run.done, run.run_id, run.writer
    seed = suite.seed if seed is None else seed

    for model_spec in suite.models:
        mname = model_key(model_spec)
        todo = [c for c in suite.cells if (mname, c.name) not in done and (cell_filter is None or cell_filter(c))]
        skipped = len(suite.cells) - len(todo)
        if skipped:
            log.info("%s: skipping %d recorded cell(s)", mname, skipped)
        if not todo:
            continue
        runner = CellRunner(suite, model_spec, run_dir, seed, limit)
        for cell in todo:
            log.info("cell %s / %s", mname, cell.name)
            try:
                recs = runner.run_cell(cell, run_id, env)
            except KeyboardInterrupt:
                log.warning("interrupted: finished cells are in %s; continue with --resume", writer.path)
                raise
            writer.write_cell(recs)
            failed = [r for r in recs if r["status"] == "failed"]
            if failed:
                log.warning("cell %s: %d metric(s) failed: %s", cell.name, len(failed), failed[0]["error"])
        del runner
        gc.collect()
    return run_dir
