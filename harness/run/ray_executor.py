"""The Ray executor: each cell a Ray task with its resource request; the driver alone writes records.

Resources come from the cell's ``resources:`` over the suite's: ``num_cpus`` (default 1),
``num_gpus`` (default 0), ``memory`` (bytes) and ``max_retries`` (default 0; Ray retries a task
whose worker died).  The cluster comes from the suite's ``executor:`` (``address``, or ``num_cpus``
of a local instance) unless the caller (``quantbench run --address``) names one.  A task that
raises, or whose worker is lost after its retries, is recorded as ``status: failed`` and the other
cells go on.  ``--resume`` reads the same ``records.jsonl`` as the
local executor, so a run can be continued with either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...methods.base import ConfigError
from ..inputs.models import model_key
from ..paths import REPO_ROOT
from .runner import CellRunner, failed_records, start_run
from .suite import Cell, ResourcesSpec, Suite

log = logging.getLogger(__name__)

_RUNNERS: dict[tuple, Any] = {}  # per worker process: one loaded base model per (suite, model, seed, limit)


def _run_cell_task(suite: Suite, model_spec: Any, cell_name: str, run_dir: str | None,
                   seed: int, limit: int | None, run_id: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Body of the Ray task (runs in a worker, on the driver's validated suite); reuses the worker's
    loaded model when it can."""
    key = (json.dumps(suite.raw, sort_keys=True, default=str), model_key(model_spec), seed, limit)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # keep one model per worker
        _RUNNERS[key] = CellRunner(suite, model_spec, Path(run_dir) if run_dir else None, seed, limit)
    cell = next(c for c in suite.cells if c.name == cell_name)
    return _RUNNERS[key].run_cell(cell, run_id, {**env, "executor": "ray"})


def _task_options(res: ResourcesSpec) -> dict[str, Any]:
    """Ray task options for a cell's resources (Ray's defaults where the suite gives none)."""
    opts: dict[str, Any] = {"num_cpus": 1 if res.num_cpus is None else res.num_cpus,
                            "num_gpus": res.num_gpus or 0, "max_retries": res.max_retries or 0,
                            "retry_exceptions": False}
    if res.memory:
        opts["memory"] = res.memory
    return opts


def run_suite_ray(
    suite: Suite,
    out: Path | None = None,
    resume: bool = False,
    seed: int | None = None,
    limit: int | None = None,
    cell_filter: Callable[[Cell], bool] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
) -> Path:
    """Run every pending cell of ``suite`` as a Ray task (cluster: ``address``/``num_cpus``, else the
    suite's ``executor:``); returns the run directory (``resume``/``force``: see ``runner.start_run``)."""
    try:
        import ray  # deferred: ray is optional
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ConfigError("the Ray executor needs Ray: pip install 'quantbench[ray]'") from e

    run = start_run(suite, out, resume, seed, limit, force)
    run_dir, env, done, run_id, writer = run.dir, run.env, run.done, run.run_id, run.writer
    seed = suite.seed if seed is None else seed
    address = suite.executor.address if address is None else address
    num_cpus = suite.executor.num_cpus if num_cpus is None else num_cpus

    started_here = not ray.is_initialized()
    if started_here:
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "TQDM_DISABLE": "1"}})
    try:
        remote = ray.remote(_run_cell_task)
        suite_ref = ray.put(suite)  # shipped once; each task gets the driver's validated suite
        pending: dict[Any, tuple[Any, Cell]] = {}
        for model_spec in suite.models:
            for cell in suite.cells:
                if (not cell.runs_on(model_spec) or (model_key(model_spec), cell.name) in done
                        or (cell_filter and not cell_filter(cell))):
                    continue
                opts = _task_options(suite.resources.merged(cell.resources))
                ref = remote.options(**opts).remote(suite_ref, model_spec, cell.name, str(run_dir), seed, limit,
                                                    run_id, env)
                pending[ref] = (model_spec, cell)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            model_spec, cell = pending.pop(ready[0])
            try:
                recs = ray.get(ready[0])
            except Exception as e:  # task raised, or its worker died after the retries
                log.error("cell %s/%s lost: %s", model_key(model_spec), cell.name, type(e).__name__)
                msg = str(e).strip().splitlines()
                prov = {**env, "executor": "ray", "seed": seed,
                        "cell_definition": run.definitions.get((model_key(model_spec), cell.name))}
                recs = failed_records(suite, model_spec, cell, run_id, prov,
                                      f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500])
            writer.write_cell(recs)
    finally:
        if started_here:
            ray.shutdown()
    return run_dir
