"""Declarative YAML suites: parsed into typed objects and validated before any work starts.

```yaml
name: default
models: [smollm2-135m]              # registry names or {name, path[, gguf_file]}
seed: 0
eval: {dataset: wiki, protocol: gptq, seq_len: 1024, max_windows: 16}
calibration: {dataset: wiki, n_samples: 32, seq_len: 512}
metrics: [perplexity, kl_divergence, top1_agreement, bits_per_weight, weight_bytes]
tolerances: {...}                    # read by `quantbench compare`
cells:
  - method: fp
  - {name: rtn-w4g128, method: rtn, params: {bits: 4, group_size: 128}}
  - {name: gptq+kvquant, method: [{method: gptq, params: {bits: 4}}, {method: kvquant}]}
  - {name: gptq-w4, method: gptq, params: {bits: 4}, calibration: {n_samples: 128}, metrics: [...]}
```
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..inputs.data import DATASETS, get_corpus
from ..measure.evaluate import PROTOCOLS
from ..inputs.models import model_key, validate_model_spec
from ...methods.base import ConfigError, build_method, did_you_mean
from ..paths import SUITES_DIR

TOP_KEYS = {"name", "description", "models", "seed", "eval", "calibration", "metrics", "cells",
            "tolerances", "resources", "tasks", "latency", "executor"}
CELL_KEYS = {"name", "method", "params", "calibration", "metrics", "resources", "tasks", "latency"}
EVAL_KEYS = {"dataset", "protocol", "seq_len", "stride", "max_windows"}
CALIB_KEYS = {"dataset", "n_samples", "seq_len"}


@dataclass(frozen=True)
class MethodSpec:
    method: str
    params: dict[str, Any]

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.method, **build_method(self.method, self.params).config.to_dict()}


@dataclass
class Cell:
    name: str
    chain: list[MethodSpec]
    calibration: dict[str, Any]
    metrics: list[str]
    resources: dict[str, Any] = field(default_factory=dict)
    tasks: Any = None
    latency: dict[str, Any] | None = None

    @property
    def method_label(self) -> str:
        return "+".join(m.method for m in self.chain)


@dataclass
class Suite:
    name: str
    description: str
    models: list[Any]
    seed: int
    eval: dict[str, Any]
    calibration: dict[str, Any]
    metrics: list[str]
    cells: list[Cell]
    tolerances: dict[str, Any]
    raw: dict[str, Any]
    path: str | None = None

    def expand(self) -> list[tuple[Any, Cell]]:
        """All (model spec, cell) pairs, models outermost (one base model load per model)."""
        return [(m, c) for m in self.models for c in self.cells]

    @staticmethod
    def cell_id(model: Any, cell: Cell) -> str:
        return f"{model_key(model)}/{cell.name}"


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _check_keys(where: str, d: Any, valid: set[str]) -> None:
    if not isinstance(d, dict):
        raise _err(where, f"expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            raise _err(where, f"unknown key '{k}'{did_you_mean(k, valid)}")


def _auto_name(chain: list[MethodSpec]) -> str:
    parts = []
    for m in chain:
        if m.params:
            args = ",".join(f"{k}={v}" for k, v in sorted(m.params.items()))
            parts.append(f"{m.method}({args})")
        else:
            parts.append(m.method)
    return "+".join(parts)


def _parse_chain(where: str, method: Any, params: Any) -> list[MethodSpec]:
    if isinstance(method, str):
        items = [{"method": method, "params": params or {}}]
    elif isinstance(method, list):
        if params:
            raise _err(where, "with a method chain, give params inside each chain entry")
        items = [{"method": m} if isinstance(m, str) else m for m in method]
    else:
        raise _err(where, f"'method' must be a name or a list, got {method!r}")
    chain = []
    for i, item in enumerate(items):
        _check_keys(f"{where}.method[{i}]", item, {"method", "params"})
        p = item.get("params") or {}
        if not isinstance(p, dict):
            raise _err(where, f"params must be a mapping, got {p!r}")
        try:
            build_method(item["method"], p)  # validates the name and every parameter
        except ConfigError as e:
            raise _err(where, str(e)) from None
        chain.append(MethodSpec(str(item["method"]), dict(p)))
    if not chain:
        raise _err(where, "empty method chain")
    return chain


def _check_metrics(where: str, metrics: Any) -> list[str]:
    from ..measure.metrics import METRICS

    if not isinstance(metrics, list) or not metrics:
        raise _err(where, "metrics must be a non-empty list")
    for m in metrics:
        if m not in METRICS:
            raise _err(where, f"unknown metric '{m}'{did_you_mean(str(m), METRICS)}")
    return list(metrics)


def _check_calibration(where: str, c: dict[str, Any]) -> dict[str, Any]:
    _check_keys(where, c, CALIB_KEYS)
    try:
        corpus = get_corpus(c["dataset"])
    except ConfigError as e:
        raise _err(where, str(e)) from None
    if "calib" not in corpus.splits:
        raise _err(where, f"dataset '{c['dataset']}' has no calibration split")
    for k in ("n_samples", "seq_len"):
        if not isinstance(c[k], int) or c[k] <= 0:
            raise _err(where, f"{k} must be a positive integer, got {c[k]!r}")
    return c


def _check_tasks(where: str, tasks: Any) -> Any:
    from ..measure.tasks import validate_tasks

    return validate_tasks(where, tasks)


def _check_latency(where: str, lat: Any) -> dict[str, Any]:
    from ..measure.latency import validate_params

    validate_params(where, lat)
    return dict(lat)


def parse_suite(raw: dict[str, Any], path: str | None = None) -> Suite:
    where = Path(path).name if path else "suite"
    _check_keys(where, raw, TOP_KEYS)
    for k in ("name", "models", "cells"):
        if k not in raw:
            raise _err(where, f"missing required key '{k}'")
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise _err(where, "models must be a non-empty list")
    for m in models:
        try:
            validate_model_spec(m)
        except ConfigError as e:
            raise _err(f"{where}.models", str(e)) from None

    ev = {"dataset": "wiki", "protocol": "gptq", "seq_len": 1024, "stride": None, "max_windows": None}
    _check_keys(f"{where}.eval", raw.get("eval", {}), EVAL_KEYS)
    ev.update(raw.get("eval", {}))
    if ev["dataset"] not in DATASETS:
        raise _err(f"{where}.eval", f"unknown dataset '{ev['dataset']}'{did_you_mean(ev['dataset'], DATASETS)}")
    if "test" not in DATASETS[ev["dataset"]].splits:
        raise _err(f"{where}.eval", f"dataset '{ev['dataset']}' has no test split")
    if ev["protocol"] not in PROTOCOLS:
        raise _err(f"{where}.eval", f"unknown protocol '{ev['protocol']}'{did_you_mean(ev['protocol'], PROTOCOLS)}")

    calib = {"dataset": "wiki", "n_samples": 32, "seq_len": 512}
    calib.update(raw.get("calibration", {}) or {})
    calib = _check_calibration(f"{where}.calibration", calib)

    metrics = _check_metrics(f"{where}.metrics", raw.get("metrics", ["perplexity"]))
    top_tasks = _check_tasks(f"{where}.tasks", raw["tasks"]) if "tasks" in raw else None
    if "latency" in raw:
        _check_latency(f"{where}.latency", raw["latency"])

    cells: list[Cell] = []
    seen: set[str] = set()
    if not isinstance(raw["cells"], list) or not raw["cells"]:
        raise _err(where, "cells must be a non-empty list")
    for i, c in enumerate(raw["cells"]):
        cw = f"{where}.cells[{i}]"
        if isinstance(c, str):
            c = {"method": c}
        _check_keys(cw, c, CELL_KEYS)
        if "method" not in c:
            raise _err(cw, "missing 'method'")
        chain = _parse_chain(cw, c["method"], c.get("params"))
        name = str(c.get("name") or _auto_name(chain))
        if name in seen:
            raise _err(cw, f"duplicate cell name '{name}'")
        seen.add(name)
        cal = dict(calib)
        cal.update(c.get("calibration") or {})
        cal = _check_calibration(f"{cw}.calibration", cal)
        cm = _check_metrics(f"{cw}.metrics", c["metrics"]) if "metrics" in c else list(metrics)
        tasks = _check_tasks(f"{cw}.tasks", c["tasks"]) if "tasks" in c else top_tasks
        lat = _check_latency(f"{cw}.latency", c["latency"]) if "latency" in c else None
        cells.append(Cell(name, chain, cal, cm, dict(c.get("resources") or {}), tasks, lat))
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise _err(where, f"seed must be an integer, got {seed!r}")
    return Suite(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        models=list(models),
        seed=seed,
        eval=ev,
        calibration=calib,
        metrics=metrics,
        cells=cells,
        tolerances=dict(raw.get("tolerances") or {}),
        raw=copy.deepcopy(raw),
        path=path,
    )


def load_suite(path: str | Path) -> Suite:
    p = Path(path)
    if not p.exists():
        builtin = SUITES_DIR / p.name
        alt = builtin if builtin.exists() else builtin.with_suffix(".yaml")
        if alt.exists():
            p = alt
        else:
            raise ConfigError(f"suite file {path} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p.name}: invalid YAML: {e}") from None
    return parse_suite(raw, str(p))


def resolved_yaml(suite: Suite) -> str:
    """The suite with defaults filled in and every method config resolved (for the run dir)."""
    doc: dict[str, Any] = {
        "name": suite.name,
        "description": suite.description,
        "models": suite.models,
        "seed": suite.seed,
        "eval": suite.eval,
        "calibration": suite.calibration,
        "metrics": suite.metrics,
        "tolerances": suite.tolerances,
        **{k: suite.raw[k] for k in ("tasks", "latency") if k in suite.raw},
        "cells": [
            {"name": c.name, "method": [m.config_dict() for m in c.chain], "calibration": c.calibration,
             "metrics": c.metrics, **({"resources": c.resources} if c.resources else {}),
             **({"tasks": c.tasks} if c.tasks else {}), **({"latency": c.latency} if c.latency else {})}
            for c in suite.cells
        ],
    }
    return yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False)
