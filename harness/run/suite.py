"""Declarative YAML suites: parsed into typed, frozen objects and validated before any work starts.

```yaml
name: default
include: [base.yaml]                # optional: suites this one extends (see below)
models: [smollm2-135m]              # registry names or {name, path[, gguf_file]}
seed: 0
eval: {dataset: wiki, protocol: gptq, seq_len: 1024, max_windows: 16}
calibration: {dataset: wiki, n_samples: 32, seq_len: 512}
metrics: [perplexity, kl_divergence, top1_agreement, bits_per_weight, weight_bytes]
tasks: [{name: wiki_cloze, limit: 40}]   # for the accuracy metric
latency: {prompt_len: 256, context: 256, decode_tokens: 8}
tolerances: {perplexity: {rel: 0.002}}   # read by `quantbench compare`; checked here
resources: {num_cpus: 2}             # what each cell's Ray task reserves (a cell's own entries win)
executor: {name: ray, address: auto} # default for `quantbench run` (its --executor/--address win)
cells:
  - method: fp
  - {name: rtn-w4g128, method: rtn, params: {bits: 4, group_size: 128}}
  - {name: gptq+kvquant, method: [{method: gptq, params: {bits: 4}}, {method: kvquant}]}
  - {name: gptq-w4, method: gptq, params: {bits: 4}, calibration: {n_samples: 128}, metrics: [...]}
```

``include`` (a file name or a list of them, relative to the including file) composes suites the
way lm-eval's task YAML ``include`` does (``lm_eval/tasks/_yaml_loader.py``): the included files are
read first, in order, each with its own includes expanded; their top-level keys are merged, a later
include's key replacing an earlier one's and the including file's own keys replacing both (whole
blocks: ``calibration: {n_samples: 128}`` does not keep the included block's other entries).
``cells`` is the exception: the included files' cells come first, in include order, then the
including file's own. Every cell is resolved against the merged top level, so an included cell
takes the including suite's ``calibration``/``metrics``/``tasks``/``latency`` unless it sets its
own. A cell defined again in a later file (a later include, or the including file) replaces the
earlier definition in place, as a later key replaces an earlier one; a cell name defined twice in
one file, a missing file and an include cycle are errors; an included file need not be a complete
suite.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ...methods.base import ConfigError, build_method, did_you_mean
from ..inputs.data import DATASETS, get_corpus
from ..inputs.models import model_key, validate_model_spec
from ..measure import METRICS
from ..measure.base import validate_tolerances
from ..measure.evaluate import PROTOCOLS
from ..measure.latency import validate_params
from ..measure.tasks import validate_tasks
from ..paths import SUITES_DIR

TOP_KEYS = {"name", "description", "include", "models", "seed", "eval", "calibration", "metrics", "cells",
            "tolerances", "resources", "tasks", "latency", "executor"}
CELL_KEYS = {"name", "method", "params", "calibration", "metrics", "resources", "tasks", "latency"}
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class MethodSpec:
    """One step of a cell's method chain: a registered method and its (validated) parameters."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.method, **build_method(self.method, self.params).config.to_dict()}


@dataclass(frozen=True)
class EvalSpec:
    """``eval:``: the evaluation text and its perplexity protocol (DESIGN.md, "Perplexity protocols")."""

    dataset: str = "wiki"
    protocol: str = "gptq"
    seq_len: int = 1024
    stride: int | None = None  # sliding protocol; None: seq_len
    max_windows: int | None = None  # None: every window of the test split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationSpec:
    """``calibration:``: ``n_samples`` windows of ``seq_len`` tokens from a dataset's calib split."""

    dataset: str = "wiki"
    n_samples: int = 32
    seq_len: int = 512

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResourcesSpec:
    """``resources:``: what one cell's Ray task reserves; None leaves Ray's default (docs/scale.md)."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None  # bytes
    max_retries: int | None = None  # reruns of a task whose worker died

    def to_dict(self) -> dict[str, Any]:
        """The entries that were given (none: ``{}``)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def merged(self, over: ResourcesSpec) -> ResourcesSpec:
        """These resources with ``over``'s given entries replacing them (a cell's over its suite's)."""
        return replace(self, **over.to_dict())


@dataclass(frozen=True)
class ExecutorSpec:
    """``executor:``: how ``quantbench run`` runs the cells unless its --executor/--address say otherwise."""

    name: str = "local"  # one of EXECUTORS
    address: str | None = None  # ray: an existing cluster ("auto", "ray://head:10001"); None: start one here
    num_cpus: int | None = None  # ray: CPUs of the local instance started when there is no address


@dataclass(frozen=True)
class Cell:
    """One row of the suite: a method chain with its resolved calibration, metrics and settings."""

    name: str
    chain: tuple[MethodSpec, ...]
    calibration: CalibrationSpec
    metrics: tuple[str, ...]
    resources: ResourcesSpec = ResourcesSpec()
    tasks: list[dict[str, Any]] | None = None  # the cell's tasks, else the suite's
    latency: dict[str, int] | None = None  # the cell's own latency settings (over the suite's)

    @property
    def method_label(self) -> str:
        return "+".join(m.method for m in self.chain)


@dataclass(frozen=True)
class Suite:
    """A validated suite: every block typed, every cell resolved against the suite's defaults."""

    name: str
    description: str
    models: tuple[Any, ...]  # registry names or {name, path[, gguf_file, dtype, device_map]}
    seed: int
    eval: EvalSpec
    calibration: CalibrationSpec
    metrics: tuple[str, ...]
    cells: tuple[Cell, ...]
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    tasks: list[dict[str, Any]] | None = None
    latency: dict[str, int] | None = None
    resources: ResourcesSpec = ResourcesSpec()
    executor: ExecutorSpec = ExecutorSpec()
    raw: dict[str, Any] = field(default_factory=dict)  # the document, includes expanded (no ``include``)
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
            raise _err(where, f"unknown key '{k}'{did_you_mean(str(k), valid)}")


def _is_int(v: Any, minimum: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _auto_name(chain: tuple[MethodSpec, ...]) -> str:
    parts = []
    for m in chain:
        if m.params:
            args = ",".join(f"{k}={v}" for k, v in sorted(m.params.items()))
            parts.append(f"{m.method}({args})")
        else:
            parts.append(m.method)
    return "+".join(parts)


def _parse_chain(where: str, method: Any, params: Any) -> tuple[MethodSpec, ...]:
    if isinstance(method, str):
        items: list[Any] = [{"method": method, "params": params or {}}]
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
    return tuple(chain)


def _check_metrics(where: str, metrics: Any) -> list[str]:
    if not isinstance(metrics, list) or not metrics:
        raise _err(where, "metrics must be a non-empty list")
    for m in metrics:
        if m not in METRICS:
            raise _err(where, f"unknown metric '{m}'{did_you_mean(str(m), METRICS)}")
    return list(metrics)


def _check_calibration(where: str, c: Any, base: CalibrationSpec | None = None) -> CalibrationSpec:
    """``c`` (a partial ``calibration:`` mapping) over ``base`` (else the defaults), validated."""
    c = c or {}
    _check_keys(where, c, set(CalibrationSpec.__dataclass_fields__))
    spec = replace(base or CalibrationSpec(), **c)
    try:
        corpus = get_corpus(spec.dataset)
    except ConfigError as e:
        raise _err(where, str(e)) from None
    if "calib" not in corpus.splits:
        raise _err(where, f"dataset '{spec.dataset}' has no calibration split")
    for k in ("n_samples", "seq_len"):
        if not _is_int(getattr(spec, k)):
            raise _err(where, f"{k} must be a positive integer, got {getattr(spec, k)!r}")
    return spec


def _check_tasks(where: str, tasks: Any) -> Any:
    return validate_tasks(where, tasks)


def _check_latency(where: str, lat: Any) -> dict[str, Any]:
    validate_params(where, lat)
    return dict(lat)


def _check_eval(where: str, e: Any) -> EvalSpec:
    _check_keys(where, e, set(EvalSpec.__dataclass_fields__))
    spec = replace(EvalSpec(), **e)
    if spec.dataset not in DATASETS:
        raise _err(where, f"unknown dataset '{spec.dataset}'{did_you_mean(str(spec.dataset), DATASETS)}")
    if "test" not in DATASETS[spec.dataset].splits:
        raise _err(where, f"dataset '{spec.dataset}' has no test split")
    if spec.protocol not in PROTOCOLS:
        raise _err(where, f"unknown protocol '{spec.protocol}'{did_you_mean(str(spec.protocol), PROTOCOLS)}")
    if not _is_int(spec.seq_len):
        raise _err(where, f"seq_len must be a positive integer, got {spec.seq_len!r}")
    for k in ("stride", "max_windows"):
        v = getattr(spec, k)
        if v is not None and not _is_int(v):
            raise _err(where, f"{k} must be a positive integer or null, got {v!r}")
    return spec


def _check_resources(where: str, r: Any) -> ResourcesSpec:
    r = r or {}
    _check_keys(where, r, set(ResourcesSpec.__dataclass_fields__))
    for k, v in r.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        if k in ("num_cpus", "num_gpus") and not number:
            raise _err(where, f"{k} must be a number >= 0 (Ray accepts fractions), got {v!r}")
        if k == "memory" and not _is_int(v):
            raise _err(where, f"memory must be a positive integer (bytes), got {v!r}")
        if k == "max_retries" and not _is_int(v, 0):
            raise _err(where, f"max_retries must be an integer >= 0, got {v!r}")
    return ResourcesSpec(**r)


def _check_executor(where: str, e: Any) -> ExecutorSpec:
    e = {"name": e} if isinstance(e, str) else e
    _check_keys(where, e, set(ExecutorSpec.__dataclass_fields__))
    spec = replace(ExecutorSpec(), **e)
    if spec.name not in EXECUTORS:
        raise _err(where, f"unknown executor '{spec.name}'{did_you_mean(str(spec.name), EXECUTORS)}")
    if spec.address is not None and not (isinstance(spec.address, str) and spec.address):
        raise _err(where, f"address must be a Ray address ('auto', 'ray://HOST:PORT', ...), got {spec.address!r}")
    if spec.num_cpus is not None and not _is_int(spec.num_cpus):
        raise _err(where, f"num_cpus must be a positive integer, got {spec.num_cpus!r}")
    if spec.name != "ray":
        extra = [k for k in ("address", "num_cpus") if getattr(spec, k) is not None]
        if extra:
            raise _err(where, f"{', '.join(extra)} applies to the ray executor only (name: ray)")
    if spec.address is not None and spec.num_cpus is not None:
        raise _err(where, "num_cpus sizes a Ray instance started here; with an address the cluster has its own")
    return spec


def _read_yaml(p: Path) -> Any:
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p.name}: invalid YAML: {e}") from None


def _expand_includes(raw: Any, path: Path | None,
                     stack: tuple[Path, ...]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """``raw`` with its ``include:`` files merged in (module docstring), recursively.

    Returns the merged document (no ``include`` key), where each of its cells was written
    (``file.cells[i]``) and which file each top-level key came from (for error messages)."""
    where = path.name if path else "suite"
    _check_keys(where, raw, TOP_KEYS)
    own_cells = raw.get("cells") or []
    if not isinstance(own_cells, list):
        raise _err(where, "cells must be a non-empty list")
    own_wheres = [f"{where}.cells[{i}]" for i in range(len(own_cells))]
    if "include" not in raw:
        return raw, own_wheres, {k: where for k in raw}
    incs = raw["include"]
    incs = [incs] if isinstance(incs, str) else incs
    if not isinstance(incs, list) or not incs or not all(isinstance(i, str) for i in incs):
        raise _err(f"{where}.include", f"expected a file name or a list of file names, got {raw['include']!r}")
    base_dir = path.parent if path else Path.cwd()
    merged: dict[str, Any] = {}
    cells: list[Any] = []
    wheres: list[str] = []
    key_files: dict[str, str] = {}
    for inc in incs:
        p = base_dir / inc
        if not p.is_file():
            here = sorted(q.name for q in base_dir.glob("*.yaml"))
            hint = did_you_mean(inc, here) if here else ""
            raise _err(f"{where}.include", f"no file '{inc}' next to {where}{hint}")
        if p.resolve() in stack:
            cycle = " -> ".join([q.name for q in stack[stack.index(p.resolve()):]] + [p.name])
            raise _err(f"{where}.include", f"include cycle: {cycle}")
        sub, sub_wheres, sub_files = _expand_includes(_read_yaml(p), p, (*stack, p.resolve()))
        _merge_cells(cells, wheres, sub.get("cells") or [], sub_wheres)
        merged.update({k: v for k, v in sub.items() if k != "cells"})
        key_files.update({k: f for k, f in sub_files.items() if k != "cells"})
    merged.update({k: v for k, v in raw.items() if k not in ("include", "cells")})
    key_files.update({k: where for k in raw if k not in ("include", "cells")})
    _merge_cells(cells, wheres, own_cells, own_wheres)
    merged["cells"] = cells
    key_files["cells"] = where
    return merged, wheres, key_files


def _merge_cells(cells: list[Any], wheres: list[str], new: list[Any], new_wheres: list[str]) -> None:
    """Append ``new`` cells; one named like a cell of an EARLIER file replaces that cell in place."""
    earlier = {_raw_name(c): i for i, c in enumerate(cells)}
    for c, w in zip(new, new_wheres):
        name = _raw_name(c)
        if name is not None and name in earlier:
            i = earlier.pop(name)  # once: the same name twice in ``new`` is a duplicate (parse_suite says so)
            cells[i], wheres[i] = c, w
        else:
            cells.append(c)
            wheres.append(w)


def _raw_name(c: Any) -> str | None:
    """A cell's name as written (a bare method name names itself); None for an unnamed mapping."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        if c.get("name"):
            return str(c["name"])
        if isinstance(c.get("method"), str) and not c.get("params"):
            return str(c["method"])
    return None


def parse_suite(raw: dict[str, Any], path: str | None = None) -> Suite:
    """Validate a suite document (``include:`` paths relative to ``path``, else to the working directory)."""
    where = Path(path).name if path else "suite"
    stack = (Path(path).resolve(),) if path else ()
    raw, cell_wheres, key_files = _expand_includes(raw, Path(path) if path else None, stack)

    def at(key: str) -> str:
        return f"{key_files.get(key, where)}.{key}"

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
            raise _err(at("models"), str(e)) from None

    ev = _check_eval(at("eval"), raw.get("eval", {}))
    calib = _check_calibration(at("calibration"), raw.get("calibration"))
    metrics = tuple(_check_metrics(at("metrics"), raw.get("metrics", ["perplexity"])))
    top_tasks = _check_tasks(at("tasks"), raw["tasks"]) if "tasks" in raw else None
    top_latency = _check_latency(at("latency"), raw["latency"]) if "latency" in raw else None
    if not isinstance(raw.get("tolerances") or {}, dict):
        raise _err(at("tolerances"), "expected a mapping of metric -> {rel, abs, recovery}")
    tolerances = validate_tolerances(raw.get("tolerances") or {}, at("tolerances"))
    resources = _check_resources(at("resources"), raw.get("resources"))
    executor = _check_executor(at("executor"), raw.get("executor", {}))

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    if not isinstance(raw["cells"], list) or not raw["cells"]:
        raise _err(where, "cells must be a non-empty list")
    for c, cw in zip(raw["cells"], cell_wheres):
        if isinstance(c, str):
            c = {"method": c}
        _check_keys(cw, c, CELL_KEYS)
        if "method" not in c:
            raise _err(cw, "missing 'method'")
        chain = _parse_chain(cw, c["method"], c.get("params"))
        name = str(c.get("name") or _auto_name(chain))
        if name in seen:
            raise _err(cw, f"duplicate cell name '{name}' (also {seen[name]})")
        seen[name] = cw
        cells.append(Cell(
            name=name,
            chain=chain,
            calibration=_check_calibration(f"{cw}.calibration", c.get("calibration"), calib),
            metrics=tuple(_check_metrics(f"{cw}.metrics", c["metrics"])) if "metrics" in c else metrics,
            resources=_check_resources(f"{cw}.resources", c.get("resources")),
            tasks=_check_tasks(f"{cw}.tasks", c["tasks"]) if "tasks" in c else top_tasks,
            latency=_check_latency(f"{cw}.latency", c["latency"]) if "latency" in c else None,
        ))
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err(at("seed"), f"seed must be an integer, got {seed!r}")
    return Suite(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        models=tuple(models),
        seed=seed,
        eval=ev,
        calibration=calib,
        metrics=metrics,
        cells=tuple(cells),
        tolerances=tolerances,
        tasks=top_tasks,
        latency=top_latency,
        resources=resources,
        executor=executor,
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
    return parse_suite(_read_yaml(p), str(p))


def resolved_yaml(suite: Suite) -> str:
    """The suite with defaults filled in and every method config resolved (for the run dir)."""
    doc: dict[str, Any] = {
        "name": suite.name,
        "description": suite.description,
        "models": suite.models,
        "seed": suite.seed,
        "eval": suite.eval.to_dict(),
        "calibration": suite.calibration.to_dict(),
        "metrics": suite.metrics,
        "tolerances": suite.tolerances,
        **{k: suite.raw[k] for k in ("tasks", "latency") if k in suite.raw},
        "cells": [
            {"name": c.name, "method": [m.config_dict() for m in c.chain], "calibration": c.calibration.to_dict(),
             "metrics": c.metrics, **({"resources": c.resources.to_dict()} if c.resources.to_dict() else {}),
             **({"tasks": c.tasks} if c.tasks else {}), **({"latency": c.latency} if c.latency else {})}
            for c in suite.cells
        ],
    }
    return yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False)
