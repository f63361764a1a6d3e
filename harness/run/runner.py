"""The local, sequential executor: models x cells -> records.jsonl, one flush per cell.

For each model: load the base model once, tokenize the evaluation split, build (or reuse) the
unquantized reference log-probs, then for each cell: fresh deep copy -> calibration -> method
chain -> metrics -> records.  A failing cell is recorded with ``status: failed`` and the run goes
on; a model that fails to load records its pending cells as failed and the run goes on with the
next model; Ctrl-C (or a crash, or kill -9) keeps every finished cell; ``resume`` skips the cells whose
every metric is recorded ok under the cell's current definition (``start_run``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ...methods.base import METHODS, Calibration, ConfigError, Method
from ...methods.quantize import quantize
from ..inputs import data as datamod
from ..inputs.models import LoadedModel, UnsupportedFamily, check_family, family_of, load_model, model_key
from ..measure import METRICS, CellContext, MetricResult, cell_params, memory
from ..measure.evaluate import EvalData, Reference, build_eval_data, evaluate
from ..measure.metrics import eval_tag
from ..paths import REPO_ROOT
from .records import (
    RecordWriter,
    completed_cells,
    environment,
    make_record,
    read_records,
    utc_now,
)
from .suite import CalibrationSpec, Cell, EvalSpec, Suite, resolved_yaml

log = logging.getLogger(__name__)


def _guarded(what: str, cell: str, measure: Any, protocol: dict[str, Any] | None = None) -> list[MetricResult]:
    """``measure()``'s results, with an exception recorded as one failed result (under ``protocol``) and a
    non-finite ok value turned into a failed one (its stderr dropped): a failing measurement never stops
    the cell's others."""
    try:
        res: list[MetricResult] = measure()
    except Exception as e:
        log.error("%s of %s failed: %s", what, cell, e)
        log.debug("%s", traceback.format_exc())
        return [MetricResult(None, dict(protocol or {}), status="failed", error=f"{type(e).__name__}: {e}")]
    for r in res:
        if r.status == "ok" and (r.value is None or (isinstance(r.value, float) and not math.isfinite(r.value))):
            r.status, r.error = "failed", f"non-finite value {r.value}"
            r.value = r.stderr = None
    return res

#: the files that make a directory a run directory (a new run refuses to write over them)
RUN_FILES = ("records.jsonl", "suite.resolved.yaml", "env.json")


def default_run_dir(suite: Suite) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return REPO_ROOT / "results" / "runs" / f"{stamp}-{suite.name}"


class CellRunner:
    """Everything needed to run the cells of one model (shared by the local and Ray executors)."""

    def __init__(self, suite: Suite, model_spec: Any, run_dir: Path | None, seed: int,
                 limit: int | None = None, loaded: LoadedModel | None = None) -> None:
        self.suite, self.model_spec, self.run_dir, self.seed, self.limit = suite, model_spec, run_dir, seed, limit
        self.definitions = {c: h for (m, c), h in definition_hashes(suite, seed, limit).items()
                            if m == model_key(model_spec)}
        self.base = loaded or load_model(model_spec)
        self.base.model.eval()
        self._calib: dict[tuple, Calibration] = {}
        self.eval_data = self._eval_data()
        #: ``eval:`` as a list: the further eval datasets (one more perplexity record each, see suite.py)
        self.extra_eval_data = [self._eval_data(ev) for ev in suite.extra_evals]
        self.reference: Reference | None = None
        if any(m in METRICS and METRICS[m].needs_reference for c in suite.cells if c.runs_on(model_spec)
               for m in c.metrics):
            self.reference = self._reference()

    def _eval_data(self, ev: EvalSpec | None = None) -> EvalData:
        ev = ev or self.suite.eval
        ids = datamod.tokens(ev.dataset, "test", self.base.tokenizer)
        max_windows = ev.max_windows
        if self.limit is not None:
            max_windows = min(max_windows or self.limit, self.limit)
        return build_eval_data(ids, ev.dataset, ev.protocol, ev.seq_len, ev.stride, max_windows, ev.batch_size)

    def _reference(self) -> Reference:
        return Reference.load_or_build(self.base.model, self.base.info, self.eval_data,
                                       datamod.cache_dir() / "reference")

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
            # a method that cannot handle the model's family fails the cell before any work (FAMILY_LIMITS)
            check_family(family_of(self.base.model), [s.method for s in cell.chain], model_key(self.model_spec))
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
                              cell_params(self.suite, cell), self.limit,
                              artifact_dir=self._cell_dir(cell) if self.run_dir else None)
            ctx.memo["peak_quantize"] = peak_quantize
            results = []
            for name in cell.metrics:
                tm = time.perf_counter()
                results.append((name, self._measure(name, ctx)))
                metric_seconds[name] = round(time.perf_counter() - tm, 3)  # shared work counts once, first
            if "perplexity" in cell.metrics and self.extra_eval_data:
                tm = time.perf_counter()
                dict(results)["perplexity"].extend(self._extra_perplexities(model, cell))
                metric_seconds["perplexity"] = round(metric_seconds["perplexity"] + time.perf_counter() - tm, 3)
            self._save_artifacts(cell, methods)
        except UnsupportedFamily as e:  # a known limit of a method: nothing to measure, nothing failed
            log.warning("cell %s: %s", cell.name, e)
            results = [(name, [MetricResult(None, status="unavailable", error=str(e))]) for name in cell.metrics]
        except Exception as e:  # a failing cell is recorded, the run goes on
            log.error("cell %s failed: %s", cell.name, e)
            log.debug("%s", traceback.format_exc())
            err = f"{type(e).__name__}: {e}"
            results = [(name, [MetricResult(None, status="failed", error=err)]) for name in cell.metrics]
        finally:
            del model
            gc.collect()
        prov = {**env, "seed": self.seed, "cell_definition": self.definitions.get(cell.name), "started": started,
                "seconds": round(time.perf_counter() - t0, 3), "metric_seconds": metric_seconds}
        log.info("cell %s: %.1f s (%s)", cell.name, prov["seconds"],
                 ", ".join(f"{k} {v:.1f}" for k, v in metric_seconds.items()))
        return self._records(cell, methods, results, run_id, prov)

    def _extra_perplexities(self, model: Any, cell: Cell) -> list[MetricResult]:
        """One perplexity result per further eval dataset (``eval_index`` 1, 2, ... in its protocol); a failing
        one is a failed result under its own protocol, the others go on."""
        out = []
        for i, data in enumerate(self.extra_eval_data, 1):
            proto = {**data.protocol, "eval_index": i}

            def measure(data: EvalData = data, proto: dict[str, Any] = proto) -> list[MetricResult]:
                s = evaluate(model, data, None, desc=f"{cell.name} [{data.protocol['dataset']}]")
                return [MetricResult(s.perplexity, proto, stderr=s.perplexity_stderr())]

            out += _guarded(f"perplexity on {data.protocol['dataset']}", cell.name, measure, proto)
        return out

    def _measure(self, name: str, ctx: CellContext) -> list[MetricResult]:
        return _guarded(f"metric {name}", ctx.cell, lambda: METRICS[name].compute(ctx))

    def _records(self, cell: Cell, methods: list[Method], results: list[tuple[str, list[MetricResult]]],
                 run_id: str, prov: dict[str, Any]) -> list[dict[str, Any]]:
        configs = [s.config_dict() for s in cell.chain]
        method_config: Any = configs[0] if len(configs) == 1 else configs
        out = []
        for name, res in results:
            spec = METRICS[name]
            for r in res:
                rprov = prov
                if spec.tag is eval_tag or name == "peak_memory_bytes":  # read (or measured over) an eval pass
                    data = [self.eval_data, *self.extra_eval_data][int((r.protocol or {}).get("eval_index") or 0)]
                    rprov = {**prov, "batch_size": data.batch_size}  # windows per forward of that pass
                out.append(make_record(
                    run_id=run_id, suite=self.suite.name, cell=cell.name, model=self._model_info(),
                    method=cell.method_label, method_config=method_config, metric=name, value=r.value,
                    unit=spec.unit, higher_is_better=spec.higher_is_better, protocol=r.protocol,
                    stderr=r.stderr, status=r.status, error=r.error, provenance=rprov,
                ))
                if r.samples is not None:
                    out[-1]["samples"] = r.samples
        return out

    def _cell_dir(self, cell: Cell) -> Path:
        """Per model and cell: a method's checkpoints must never be resumed by another model's cell."""
        assert self.run_dir is not None
        return self.run_dir / "cells" / _safe(model_key(self.model_spec)) / _safe(cell.name)

    def _model_info(self) -> dict[str, Any]:
        """The model as recorded; its name is the spec's key, the one resume looks cells up under."""
        i = self.base.info
        return {"name": model_key(self.model_spec),
                **{k: i.get(k) for k in ("source", "sha256", "params", "source_precision", "dtype", "device")}}

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


def failed_records(suite: Suite, model_spec: Any, cell: Cell, run_id: str, prov: dict[str, Any],
                   error: str) -> list[dict[str, Any]]:
    """One failed record per metric of a cell that never ran (its model did not load, its Ray task was lost)."""
    info = {"name": model_key(model_spec), "source": None, "sha256": None, "params": None,
            "source_precision": None, "dtype": None}
    prov = {"started": utc_now(), "seconds": None, **prov}
    configs = [m.config_dict() for m in cell.chain]  # the same resolved configs a measured cell records
    return [make_record(run_id=run_id, suite=suite.name, cell=cell.name, model=info, method=cell.method_label,
                        method_config=configs[0] if len(configs) == 1 else configs, metric=name, value=None,
                        unit=METRICS[name].unit, higher_is_better=METRICS[name].higher_is_better,
                        status="failed", error=error, provenance=prov)
            for name in cell.metrics]


# --------------------------------------------------------------------------- run directory and resume

def resolved_text(suite: Suite, seed: int | None = None, limit: int | None = None) -> str:
    """``suite.resolved.yaml``: the suite as run (the effective seed; ``limit`` when one was given)."""
    text = resolved_yaml(suite if seed is None else replace(suite, seed=seed))
    return text + (yaml.safe_dump({"limit": limit}) if limit is not None else "")


def _needs_calibration(chain: list[Any]) -> bool:
    names = [str(m.get("method")) if isinstance(m, dict) else "" for m in chain]
    return any(n not in METHODS or METHODS[n].needs_calibration for n in names)


def _eval_definition(ev: Any) -> Any:
    """``eval:`` (a mapping or a list of them) without ``batch_size``: windows per forward change no value
    (<= 1e-6 relative, the GEMM blocking of a batched forward), so a run resumes under another batch size;
    the records say which one measured them (``provenance.batch_size``)."""
    if isinstance(ev, dict):
        return {k: v for k, v in ev.items() if k != "batch_size"}
    if isinstance(ev, list):
        return [_eval_definition(e) for e in ev]
    return ev


def cell_definitions(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model key, cell) of a resolved suite document, everything its records depend on: the model
    spec, seed, eval (but its ``batch_size``: :func:`_eval_definition`) and limit, the method chain's configs,
    the calibration (when a method of the chain calibrates), the metrics and the suite blocks they read
    (``tasks``, ``latency``)."""
    defs: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in doc.get("cells") or []:
        chain = cell.get("method") or []
        metrics = list(cell.get("metrics") or [])
        blocks = sorted({str(METRICS[m].params) for m in metrics if m in METRICS and METRICS[m].params})
        common = {"seed": doc.get("seed"), "eval": _eval_definition(doc.get("eval")), "limit": doc.get("limit"),
                  "method": chain,
                  "calibration": cell.get("calibration") if _needs_calibration(chain) else None,
                  "metrics": sorted(metrics), **{b: cell.get(b, doc.get(b)) for b in blocks}}
        only = cell.get("models")  # ``models:``: the cell runs on these model keys only
        for spec in doc.get("models") or []:
            if only is None or model_key(spec) in only:
                defs[(model_key(spec), str(cell.get("name")))] = {"model": spec, **common}
    return defs


def _hash(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:16]


def definition_hashes(suite: Suite, seed: int | None = None, limit: int | None = None) -> dict[tuple[str, str], str]:
    """(model key, cell) -> the hash of its definition (``provenance.cell_definition`` of its records)."""
    doc = yaml.safe_load(resolved_text(suite, seed, limit))
    return {k: _hash(d) for k, d in cell_definitions(doc).items()}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a crash leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _changed_cells(old_text: str, new_doc: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """Cells of both documents whose definitions differ, with the fields that differ."""
    try:
        old_doc = yaml.safe_load(old_text)
    except yaml.YAMLError as e:
        log.warning("suite.resolved.yaml of the run is unreadable (%s); cells are matched by their records", e)
        return {}
    if not isinstance(old_doc, dict):
        return {}
    old, new = cell_definitions(old_doc), cell_definitions(new_doc)
    return {k: [f for f in dict.fromkeys([*old[k], *d]) if old[k].get(f) != d.get(f)]
            for k, d in new.items() if k in old and old[k] != d}


@dataclass
class RunState:
    dir: Path
    env: dict[str, Any]
    done: set[tuple[str, str]]
    run_id: str
    writer: RecordWriter
    definitions: dict[tuple[str, str], str]  # (model key, cell) -> definition hash


def start_run(suite: Suite, out: Path | None, resume: bool, seed: int | None = None, limit: int | None = None,
              force: bool = False) -> RunState:
    """Create (or, with ``resume``, reopen) a run directory; shared by every executor.

    A new run refuses a directory that already holds a run. ``resume`` restores a torn last write
    of ``records.jsonl`` and compares the suite with the run's ``suite.resolved.yaml``: a cell whose
    definition changed (``cell_definitions``) is refused (ConfigError) unless ``force``, which reruns
    the changed cells (their old records are superseded) and rewrites ``suite.resolved.yaml``."""
    keys = [model_key(m) for m in suite.models]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"models {twice} share a name; give each a distinct 'name:' (records and resume key on it)")
    if force and not resume:
        raise ConfigError("--force applies to --resume (rerun the cells whose definition changed)")
    seed = suite.seed if seed is None else seed
    run_dir = Path(out) if out else default_run_dir(suite)
    records_path = run_dir / "records.jsonl"
    resolved_path = run_dir / "suite.resolved.yaml"
    if not resume:
        held = [f for f in RUN_FILES if (run_dir / f).exists()]
        if held:
            raise FileExistsError(f"{run_dir} already holds a run ({', '.join(held)}); continue it with --resume "
                                  "or choose another --out")
    new_text = resolved_text(suite, seed, limit)
    new_doc = yaml.safe_load(new_text)
    hashes = {k: _hash(d) for k, d in cell_definitions(new_doc).items()}
    metrics = {c.name: c.metrics for c in suite.cells}
    writer = RecordWriter(records_path)
    changed: dict[tuple[str, str], list[str]] = {}
    if resume:
        writer.repair({k: metrics[k[1]] for k in hashes})
        if resolved_path.exists():
            changed = _changed_cells(resolved_path.read_text(encoding="utf-8"), new_doc)
        described = [f"{m}/{c} ({', '.join(fields)})" for (m, c), fields in changed.items()]
        if len(described) > 12:
            described = described[:12] + [f"and {len(described) - 12} more"]
        if changed and not force:
            raise ConfigError(f"the suite changed since {run_dir} started: {'; '.join(described)}; rerun these "
                              "cells with --resume --force (their old records are superseded) or start a new run")
        if changed:
            log.warning("--force: rerunning %d changed cell(s), their old records superseded: %s", len(changed),
                        "; ".join(described))
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(resolved_path, new_text)
    env = environment()
    _write_atomic(run_dir / "env.json", json.dumps(env, indent=1))
    existing = read_records(records_path)
    run_id = existing[0]["run_id"] if existing else run_dir.name
    expected = {k: (metrics[k[1]], h) for k, h in hashes.items()}
    done = completed_cells(existing, expected) - set(changed)
    return RunState(run_dir, env, done, run_id, writer, hashes)


def run_suite(
    suite: Suite,
    out: Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    limit: int | None = None,
    cell_filter: Callable[[Cell], bool] | None = None,
    force: bool = False,
) -> Path:
    """Run every pending cell of ``suite`` locally; returns the run directory (``force``: see start_run)."""
    run = start_run(suite, out, resume, seed, limit, force)
    done = run.done
    seed = suite.seed if seed is None else seed
    pending = {model_key(m): [c for c in suite.cells if c.runs_on(m) and (model_key(m), c.name) not in done
                              and (cell_filter is None or cell_filter(c))] for m in suite.models}
    # one bar over the run's pending cells, its ETA from the finished ones; silent when stderr is no TTY
    bar = tqdm(total=sum(len(t) for t in pending.values()), desc=suite.name, unit="cell", disable=None,
               dynamic_ncols=True)
    with bar, (logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()):
        _run_models(suite, run, pending, seed, limit, bar)
    return run.dir


def _run_models(suite: Suite, run: RunState, pending: dict[str, list[Cell]], seed: int, limit: int | None,
                bar: tqdm) -> None:
    env, run_id, writer, run_dir = run.env, run.run_id, run.writer, run.dir
    for model_spec in suite.models:
        mname = model_key(model_spec)
        todo = pending[mname]
        skipped = sum(c.runs_on(model_spec) for c in suite.cells) - len(todo)
        if skipped:
            log.info("%s: skipping %d recorded cell(s)", mname, skipped)
        if not todo:
            continue
        try:
            runner = CellRunner(suite, model_spec, run_dir, seed, limit)
        except Exception as e:  # a model that does not load fails its cells; the next model goes on
            err = f"{type(e).__name__}: {e}"
            log.error("model %s failed to load (%s): its %d pending cell(s) are recorded as failed", mname, err,
                      len(todo))
            log.debug("%s", traceback.format_exc())
            for cell in todo:
                prov = {**env, "seed": seed, "cell_definition": run.definitions.get((mname, cell.name))}
                writer.write_cell(failed_records(suite, model_spec, cell, run_id, prov, err))
            bar.update(len(todo))
            continue
        for cell in todo:
            log.info("cell %s / %s", mname, cell.name)
            bar.set_postfix_str(f"{mname}/{cell.name}")
            try:
                recs = runner.run_cell(cell, run_id, env)
            except KeyboardInterrupt:
                log.warning("interrupted: finished cells are in %s; continue with --resume", writer.path)
                raise
            writer.write_cell(recs)
            bar.update(1)
            failed = [r for r in recs if r["status"] == "failed"]
            if failed:
                log.warning("cell %s: %d metric(s) failed: %s", cell.name, len(failed), failed[0]["error"])
        del runner
        gc.collect()
