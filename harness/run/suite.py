"""Declarative YAML suites: parsed into typed, frozen objects and validated before any work starts.

```yaml
name: default
include: [base.yaml]                # optional: suites this one extends (see below)
models: [smollm2-135m]              # names, paths, hub ids, {name?, path, dtype?, device?}, {random: llama}
seed: 0
eval: {dataset: wiki, protocol: gptq, seq_len: 1024, max_windows: 16}   # or a list of them (below); batch_size: N
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
  - {name: fp-train, method: fp-train, models: [tiny-llama]}   # only on these models (default: all)
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

``eval`` may also be a list of eval specs (``eval: [{dataset: wiki, ...}, {dataset: kjv, ...}]``). The first
is the primary evaluation: its perplexity is the cell's usual ``perplexity`` record, and it is the text
every statistic against the reference (KL, top-1, ln ppl ratio, Δppl) and every existing leaderboard
column is measured on, exactly as with a single mapping (which stays the same suite: same resolved
definition, same records). Each further spec adds, to every cell that measures ``perplexity``, one more
``perplexity`` record on that text, with no reference statistics; records tell them apart by their
protocol tag (``dataset/protocol/seq_len``, ``metric.eval_tag``, as accuracy records are told apart
by task) and carry ``eval_index`` (1, 2, ...) in their protocol; the leaderboard shows them as
``ppl <dataset>`` columns next to the primary's.  Every spec is validated before any work (an unknown
dataset, one without a ``test`` split, ``random``, or two specs with the same tag: one-line ConfigError).

A suite file is UTF-8 YAML read by a safe loader that also refuses a key given twice in one mapping and
a document whose aliases expand past :data:`MAX_NODES` nodes (an alias bomb); every error, in the file
or in what it says, is one line (:class:`ConfigError`), raised before anything is run or written.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ...methods.base import ConfigError, build_method, did_you_mean
from ..inputs.data import DATASETS, RANDOM, get_corpus
from ..inputs.models import family_problems, model_key, preflight, validate_model_spec, with_settings
from ..measure import METRICS
from ..measure.base import validate_tolerances
from ..measure.evaluate import PROTOCOLS
from ..measure.latency import validate_params
from ..measure.metrics import eval_tag
from ..measure.tasks import validate_tasks
from ..paths import SUITES_DIR

TOP_KEYS = {"name", "description", "include", "models", "seed", "eval", "calibration", "metrics", "cells",
            "tolerances", "resources", "tasks", "latency", "executor"}
CELL_KEYS = {"name", "method", "params", "calibration", "metrics", "resources", "tasks", "latency", "models"}
EXECUTORS = ("local", "ray")
MAX_COUNT = 1_000_000  # the most samples, tokens, windows, steps... a suite may ask for
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds: 0 .. 2**32 - 1
MAX_FILE_BYTES = 1 << 20  # a suite file is text of a few KiB
MAX_NODES = 100_000  # YAML nodes of one file once its aliases are expanded
MAX_DEPTH = 64  # nesting of one file's YAML
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")  # a suite's name names its run dir and baseline


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
    #: windows per forward pass (``--batch-size``); changes no value (<= 1e-6 relative: GEMM blocking), so it is
    #: left out of a cell's definition (``runner.cell_definitions``): a run resumes under another batch size
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["batch_size"] == 1:  # the default: a suite that does not set it resolves as it did before the key
            del d["batch_size"]
        return d


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
    models: tuple[str, ...] | None = None  # ``models:``: the model keys the cell runs on (None: every model)

    @property
    def method_label(self) -> str:
        return "+".join(m.method for m in self.chain)

    def runs_on(self, model: Any) -> bool:
        """Whether the cell runs on model spec ``model`` (its ``models:`` list names it, or there is none)."""
        return self.models is None or model_key(model) in self.models


@dataclass(frozen=True)
class Suite:
    """A validated suite: every block typed, every cell resolved against the suite's defaults."""

    name: str
    description: str
    models: tuple[Any, ...]  # model specs (harness/inputs/models.py): names, paths, hub ids, mappings
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
    extra_evals: tuple[EvalSpec, ...] = ()  # ``eval:`` given as a list: the specs after the primary (``eval``)

    @property
    def evals(self) -> tuple[EvalSpec, ...]:
        """Every eval spec, the primary first."""
        return (self.eval, *self.extra_evals)

    def expand(self) -> list[tuple[Any, Cell]]:
        """All (model spec, cell) pairs a cell runs on (its ``models:``), models outermost (one base model load
        per model)."""
        return [(m, c) for m in self.models for c in self.cells if c.runs_on(m)]

    @staticmethod
    def cell_id(model: Any, cell: Cell) -> str:
        return f"{model_key(model)}/{cell.name}"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _show(v: Any) -> str:
    """``repr(v)`` cut to a readable length (a message quotes what the file said, never a whole block)."""
    return _REPR.repr(v)


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}")


def _check_keys(where: str, d: Any, valid: set[str]) -> None:
    if not isinstance(d, dict):
        raise _err(where, f"expected a mapping, got {type(d).__name__}")
    for k in d:
        if not isinstance(k, str):
            raise _err(where, f"a key is a name, got {_show(k)} ({type(k).__name__})")
        if k not in valid:
            raise _err(where, f"unknown key {k!r}{did_you_mean(k, valid)}")


def _is_int(v: Any, minimum: int = 1, maximum: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum


def _int_problem(name: str, v: Any, minimum: int = 1, maximum: int = MAX_COUNT, nullable: bool = False) -> str | None:
    """Why ``v`` is not an integer in ``minimum..maximum`` ("seq_len must be a positive integer, got 0"), or None."""
    if (v is None and nullable) or _is_int(v, minimum, maximum):
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v > maximum:
        return f"{name} must be at most {maximum}, got {v}"
    kind = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    return f"{name} must be {kind}{' or null' if nullable else ''}, got {_show(v)}"


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except (OverflowError, TypeError):  # an int too large for a float
        return False


def _is_number(v: Any, minimum: float = 0.0, maximum: float = float(MAX_COUNT)) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) and minimum <= v <= maximum


def _check_name(where: str, name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _err(where, f"{what} must be a non-empty string, got {_show(name)}")
    if not name.isprintable():
        raise _err(where, f"{what} must not hold control characters (newlines, tabs), got {_show(name)}")
    return name


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
        raise _err(where, f"'method' must be a name or a list, got {_show(method)}")
    chain = []
    for i, item in enumerate(items):
        _check_keys(f"{where}.method[{i}]", item, {"method", "params"})
        if "method" not in item:
            raise _err(f"{where}.method[{i}]", "missing 'method'")
        if not isinstance(item["method"], str):
            raise _err(f"{where}.method[{i}]", f"'method' must be a name, got {_show(item['method'])}")
        p = item.get("params") or {}
        if not isinstance(p, dict):
            raise _err(where, f"params must be a mapping, got {_show(p)}")
        try:
            build_method(item["method"], p)  # validates the name and every parameter
        except ConfigError as e:
            raise _err(where, str(e)) from None
        chain.append(MethodSpec(item["method"], dict(p)))
    if not chain:
        raise _err(where, "empty method chain")
    return tuple(chain)


def _check_metrics(where: str, metrics: Any) -> list[str]:
    if not isinstance(metrics, list) or not metrics:
        raise _err(where, "metrics must be a non-empty list")
    for m in metrics:
        if not isinstance(m, str):
            raise _err(where, f"a metric is a name, got {_show(m)}")
        if m not in METRICS:
            raise _err(where, f"unknown metric {m!r}{did_you_mean(m, METRICS)}")
    if len(set(metrics)) != len(metrics):
        twice = next(m for m in metrics if metrics.count(m) > 1)
        raise _err(where, f"metric {twice!r} is listed twice")
    return list(metrics)


def _check_dataset(where: str, name: Any, split: str, what: str) -> None:
    if not isinstance(name, str):
        raise _err(where, f"dataset must be a name, got {_show(name)}")
    if name not in DATASETS:
        raise _err(where, f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}")
    try:
        corpus = get_corpus(name)
    except ConfigError as e:
        raise _err(where, str(e)) from None
    if split not in corpus.splits:
        raise _err(where, f"dataset {name!r} has no {what} split")


def _check_calibration(where: str, c: Any, base: CalibrationSpec | None = None) -> CalibrationSpec:
    """``c`` (a partial ``calibration:`` mapping) over ``base`` (else the defaults), validated."""
    c = c or {}
    _check_keys(where, c, set(CalibrationSpec.__dataclass_fields__))
    spec = replace(base or CalibrationSpec(), **c)
    _check_dataset(where, spec.dataset, "calib", "calibration")
    for k in ("n_samples", "seq_len"):
        if problem := _int_problem(k, getattr(spec, k)):
            raise _err(where, problem)
    return spec


def _check_tasks(where: str, tasks: Any) -> Any:
    if isinstance(tasks, list):
        for i, t in enumerate(tasks):
            name = t.get("name") if isinstance(t, dict) else t
            if not isinstance(name, str) or not name:
                raise _err(f"{where}[{i}]", f"a task is a name or a mapping with 'name', got {_show(t)}")
    out = validate_tasks(where, tasks)
    for i, t in enumerate(out):
        for k in ("limit", "shots", "batch_size"):
            if isinstance(t.get(k), int) and t[k] > MAX_COUNT:
                raise _err(f"{where}[{i}]", f"{k} must be at most {MAX_COUNT}, got {t[k]}")
    return out


def _check_latency(where: str, lat: Any) -> dict[str, Any]:
    if not isinstance(lat, dict):
        raise _err(where, f"latency must be a mapping, got {_show(lat)}")
    validate_params(where, lat)
    for k, v in lat.items():
        if v > MAX_COUNT:
            raise _err(where, f"latency.{k} must be at most {MAX_COUNT}, got {v}")
    return dict(lat)


def _check_evals(where: str, e: Any) -> tuple[EvalSpec, tuple[EvalSpec, ...]]:
    """``eval:`` as one mapping or a list of them: (the primary, the further specs), each validated."""
    if not isinstance(e, list):
        return _check_eval(where, e), ()
    if not e:
        raise _err(where, "eval must be a mapping or a non-empty list of them")
    specs = [_check_eval(f"{where}[{i}]", x) for i, x in enumerate(e)]
    seen: dict[str, int] = {}
    for i, sp in enumerate(specs):
        tag = eval_tag({"dataset": sp.dataset, "name": sp.protocol, "seq_len": sp.seq_len,
                        "stride": sp.stride or sp.seq_len})
        if tag in seen:
            raise _err(f"{where}[{i}]", f"same dataset, protocol and seq_len ({tag}) as eval[{seen[tag]}]: "
                                        "their perplexity records could not be told apart")
        seen[tag] = i
    return specs[0], tuple(specs[1:])


def _check_eval(where: str, e: Any) -> EvalSpec:
    _check_keys(where, e, set(EvalSpec.__dataclass_fields__))
    spec = replace(EvalSpec(), **e)
    if spec.dataset == RANDOM:
        raise _err(where, f"dataset {RANDOM!r} is random token ids, for calibration only; evaluate on a text "
                          "corpus with a test split (wiki, kjv, moby, ...)")
    _check_dataset(where, spec.dataset, "test", "test")
    if not isinstance(spec.protocol, str) or spec.protocol not in PROTOCOLS:
        raise _err(where, f"unknown protocol {_show(spec.protocol)}{did_you_mean(str(spec.protocol), PROTOCOLS)}")
    if problem := _int_problem("seq_len", spec.seq_len):
        raise _err(where, problem)
    for k in ("stride", "max_windows"):
        if problem := _int_problem(k, getattr(spec, k), nullable=True):
            raise _err(where, problem)
    if problem := _int_problem("batch_size", spec.batch_size):
        raise _err(where, problem)
    return spec


def _check_tolerances(where: str, tol: Any) -> dict[str, dict[str, float]]:
    tol = tol or {}
    if not isinstance(tol, dict):
        raise _err(where, "expected a mapping of metric -> {rel, abs, recovery}")
    for metric, spec in tol.items():
        if not isinstance(metric, str):
            raise _err(where, f"a metric is a name, got {_show(metric)}")
        if isinstance(spec, dict):
            for k, v in spec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite(v):
                    raise _err(f"{where}.{metric}.{k}", f"expected a finite number, got {_show(v)}")
    return validate_tolerances(tol, where)


def _check_resources(where: str, r: Any) -> ResourcesSpec:
    r = r or {}
    _check_keys(where, r, set(ResourcesSpec.__dataclass_fields__))
    for k, v in r.items():
        if k in ("num_cpus", "num_gpus") and not _is_number(v):
            raise _err(where, f"{k} must be a number in 0..{MAX_COUNT} (Ray accepts fractions), got {_show(v)}")
        if k == "memory" and (problem := _int_problem("memory", v, 1, 2**60)):
            raise _err(where, problem.replace("positive integer", "positive integer (bytes)"))
        if k == "max_retries" and (problem := _int_problem("max_retries", v, 0, 1000)):
            raise _err(where, problem)
    return ResourcesSpec(**r)


def _check_executor(where: str, e: Any) -> ExecutorSpec:
    e = {"name": e} if isinstance(e, str) else e
    _check_keys(where, e, set(ExecutorSpec.__dataclass_fields__))
    spec = replace(ExecutorSpec(), **e)
    if not isinstance(spec.name, str) or spec.name not in EXECUTORS:
        raise _err(where, f"unknown executor {_show(spec.name)}{did_you_mean(str(spec.name), EXECUTORS)}")
    if spec.address is not None and not (isinstance(spec.address, str) and spec.address.strip()
                                         and not any(ch.isspace() for ch in spec.address)):
        raise _err(where, f"address must be a Ray address ('auto', 'ray://HOST:PORT', ...), got {_show(spec.address)}")
    if problem := _int_problem("num_cpus", spec.num_cpus, nullable=True):
        raise _err(where, problem.replace(" or null", ""))
    if spec.name != "ray":
        extra = [k for k in ("address", "num_cpus") if getattr(spec, k) is not None]
        if extra:
            raise _err(where, f"{', '.join(extra)} applies to the ray executor only (name: ray)")
    if spec.address is not None and spec.num_cpus is not None:
        raise _err(where, "num_cpus sizes a Ray instance started here; with an address the cluster has its own")
    return spec


class _SuiteYAMLError(yaml.YAMLError):
    """What :class:`_SuiteLoader` refuses (a duplicate key, an alias bomb), as one line."""


class _SuiteLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML silently keeps the last) and a document that expands, aliases followed, to more than
    :data:`MAX_NODES` nodes or :data:`MAX_DEPTH` levels (an alias bomb's few lines expand exponentially)
    or that contains itself (``&a [*a]``)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, 0, {}, set())
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            seen = first.setdefault((key_node.tag, key_node.value), key_node)
            if seen is not key_node:
                raise _SuiteYAMLError(f"duplicate key {key_node.value!r} at line {key_node.start_mark.line + 1} "
                                      f"(first at line {seen.start_mark.line + 1})")
        return node


def _expanded_size(node: Any, depth: int, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under ``node`` with every alias expanded (memoized: an alias bomb is counted, not expanded)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    line = node.start_mark.line + 1
    if key in open_:
        raise _SuiteYAMLError(f"an alias at line {line} refers to a node that contains it (a recursive structure)")
    if depth > MAX_DEPTH:
        raise _SuiteYAMLError(f"nested deeper than {MAX_DEPTH} levels at line {line}")
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    n = 1
    for child in children:
        n += _expanded_size(child, depth + 1, sizes, open_)
        if n > MAX_NODES:
            raise _SuiteYAMLError(f"the document expands to more than {MAX_NODES} nodes with its aliases followed "
                                  f"(at line {line}); write the suite out")
    open_.discard(key)
    sizes[key] = n
    return n


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _path_kind(p: Path, where: str) -> str:
    """"file", "dir", "other" or "missing"; ConfigError for a path the system cannot look up (too long, NUL)."""
    try:
        if p.is_file():
            return "file"
        if p.is_dir():
            return "dir"
        return "other" if p.exists() else "missing"
    except (OSError, ValueError) as e:
        raise _err(where, f"cannot look up {_show(str(p))}: {getattr(e, 'strerror', None) or e}") from None


def _read_yaml(p: Path) -> Any:
    """A suite file's document: UTF-8 YAML of at most :data:`MAX_FILE_BYTES`, read by :class:`_SuiteLoader`."""
    kind = _path_kind(p, "suite file")
    if kind == "missing":
        raise ConfigError(f"suite file {p} not found")
    if kind != "file":
        raise ConfigError(f"{p}: {'a directory' if kind == 'dir' else 'not a regular file'}, not a suite file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{p.name}: larger than {MAX_FILE_BYTES} bytes; a suite file is a few KiB of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p.name}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                          "save the suite as UTF-8") from None
    try:
        return yaml.load(text, Loader=_SuiteLoader)  # a SafeLoader
    except _SuiteYAMLError as e:
        raise ConfigError(f"{p.name}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = _one_line(" ".join(x for x in (e.context, e.problem) if x) or type(e).__name__)
        raise ConfigError(f"{p.name}: invalid YAML{at}: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p.name}: invalid YAML: {_one_line(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{p.name}: invalid YAML: nested too deeply") from None
    except Exception as e:  # PyYAML's constructors raise plain errors for a bad explicit tag (``!!float x``)
        raise ConfigError(f"{p.name}: invalid YAML: a value does not fit its tag "
                          f"({_one_line(f'{type(e).__name__}: {e}')})") from None


def _expand_includes(raw: Any, path: Path | None,
                     stack: tuple[Path, ...]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """``raw`` with its ``include:`` files merged in (module docstring), recursively.

    Returns the merged document (no ``include`` key), where each of its cells was written
    (``file.cells[i]``) and which file each top-level key came from (for error messages)."""
    where = path.name if path else "suite"
    if raw is None:
        raise _err(where, "empty document; a suite is a mapping with name, models and cells")
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
        raise _err(f"{where}.include", f"expected a file name or a list of file names, got {_show(raw['include'])}")
    base_dir = path.parent if path else Path.cwd()
    merged: dict[str, Any] = {}
    cells: list[Any] = []
    wheres: list[str] = []
    key_files: dict[str, str] = {}
    for inc in incs:
        p = base_dir / inc
        if _path_kind(p, f"{where}.include") != "file":
            here = sorted(q.name for q in base_dir.glob("*.yaml"))
            hint = did_you_mean(inc, here) if here else ""
            raise _err(f"{where}.include", f"no file {inc!r} next to {where}{hint}")
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


def _check_models(where: str, models: list[Any]) -> None:
    """Each model spec names something loadable (checked without loading or the network), each key once."""
    model_keys: set[str] = set()
    for m in models:
        try:
            validate_model_spec(m)
        except ConfigError as e:
            raise _err(where, str(e)) from None
        if model_key(m) in model_keys:
            raise _err(where, f"model {model_key(m)!r} is listed twice (give each a distinct name)")
        model_keys.add(model_key(m))


def _check_cell_models(where: str, names: Any, models: list[Any]) -> tuple[str, ...]:
    """A cell's ``models:``: a non-empty list of the suite's model keys (each once)."""
    keys = [model_key(m) for m in models]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _err(where, f"models must be a non-empty list of the suite's model names, got {_show(names)}")
    for n in names:
        if n not in keys:
            raise _err(where, f"unknown model {n!r}{did_you_mean(n, keys)}; the suite's models: {', '.join(keys)}")
    if len(set(names)) != len(names):
        raise _err(where, f"a model is listed twice in {_show(names)}")
    return tuple(names)


def preflight_suite(suite: Suite) -> list[str]:
    """Before a run: each model's device exists and its hub id resolves (ConfigError otherwise); returns the
    (model, cell) pairs whose method cannot handle the model's family, which the runner records unavailable
    without quantizing (``models.FAMILY_LIMITS``), as "model/cell: why"."""
    problems = []
    chains = [(c.name, [s.method for s in c.chain]) for c in suite.cells]
    for m in suite.models:
        family = preflight(m)
        problems += [f"{model_key(m)}/{p}" for p in family_problems(family, chains, model_key(m))]
    return problems


def cell_filter(patterns: Sequence[str]) -> Callable[[Any], bool] | None:
    """``--cells``: a predicate on cells whose name matches one of the glob ``patterns``; None (every cell)
    when there are none."""
    pats = [p for p in patterns if p]
    if not pats:
        return None
    return lambda c: any(fnmatch.fnmatch(c.name, p) for p in pats)


def with_models(suite: Suite, models: list[Any] | None = None, dtype: str | None = None,
                device: str | None = None) -> Suite:
    """``suite`` with its models replaced (``--model``) and each given ``dtype``/``device`` (``--dtype``,
    ``--device``), validated as the suite's own models are."""
    specs = list(suite.models if models is None else models)
    if not specs:
        raise ConfigError("--model: give at least one model")
    _check_models("--model" if models is not None else "models", specs)
    try:
        specs = [with_settings(m, dtype, device) for m in specs]
    except ConfigError as e:
        raise ConfigError(f"--dtype/--device: {e}") from None
    cells = suite.cells if models is None else tuple(replace(c, models=None) for c in suite.cells)  # --model: all
    return replace(suite, models=tuple(specs), cells=cells, raw={**suite.raw, "models": specs})


def with_batch_size(suite: Suite, batch_size: int) -> Suite:
    """``suite`` with every eval spec's ``batch_size`` set (``--batch-size``): windows per forward pass."""
    if problem := _int_problem("--batch-size", batch_size):
        raise ConfigError(problem)
    return replace(suite, eval=replace(suite.eval, batch_size=batch_size),
                   extra_evals=tuple(replace(e, batch_size=batch_size) for e in suite.extra_evals))


def parse_suite(raw: dict[str, Any], path: str | None = None) -> Suite:
    """Validate a suite document (``include:`` paths relative to ``path``, else to the working directory).

    Raises :class:`ConfigError` with a one-line message for anything wrong in it or in the files it includes."""
    try:
        return _parse_suite(raw, path)
    except ConfigError as e:
        msg = str(e)
        if "\n" in msg or "\r" in msg:  # a name quoted from the file may hold a newline
            raise ConfigError(_one_line(msg)) from None
        raise


def _parse_suite(raw: dict[str, Any], path: str | None) -> Suite:
    where = Path(path).name if path else "suite"
    stack = (Path(path).resolve(),) if path else ()
    raw, cell_wheres, key_files = _expand_includes(raw, Path(path) if path else None, stack)

    def at(key: str) -> str:
        return f"{key_files.get(key, where)}.{key}"

    for k in ("name", "models", "cells"):
        if k not in raw:
            raise _err(where, f"missing required key '{k}'")
    name = _check_name(at("name"), raw["name"], "name")
    if not SAFE_NAME.fullmatch(name):
        raise _err(at("name"), f"name {name!r} names the run directory and the baseline file: use letters, "
                               "digits and '.', '_', '+', '=', '-' (at most 100 characters, not starting with one)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _err(at("description"), f"description must be a string, got {_show(description)}")
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise _err(where, "models must be a non-empty list")
    _check_models(at("models"), models)

    ev, extra_evals = _check_evals(at("eval"), raw.get("eval", {}))
    calib = _check_calibration(at("calibration"), raw.get("calibration"))
    metrics = tuple(_check_metrics(at("metrics"), raw.get("metrics", ["perplexity"])))
    top_tasks = _check_tasks(at("tasks"), raw["tasks"]) if "tasks" in raw else None
    top_latency = _check_latency(at("latency"), raw["latency"]) if "latency" in raw else None
    tolerances = _check_tolerances(at("tolerances"), raw.get("tolerances"))
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
        cell_name = _check_name(cw, c["name"], "a cell's name") if "name" in c else _auto_name(chain)
        if cell_name in seen:
            raise _err(cw, f"duplicate cell name {cell_name!r} (also {seen[cell_name]})")
        seen[cell_name] = cw
        cells.append(Cell(
            name=cell_name,
            chain=chain,
            calibration=_check_calibration(f"{cw}.calibration", c.get("calibration"), calib),
            metrics=tuple(_check_metrics(f"{cw}.metrics", c["metrics"])) if "metrics" in c else metrics,
            resources=_check_resources(f"{cw}.resources", c.get("resources")),
            tasks=_check_tasks(f"{cw}.tasks", c["tasks"]) if "tasks" in c else top_tasks,
            latency=_check_latency(f"{cw}.latency", c["latency"]) if "latency" in c else None,
            models=_check_cell_models(f"{cw}.models", c["models"], models) if "models" in c else None,
        ))
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err(at("seed"), f"seed must be an integer, got {_show(seed)}")
    if not 0 <= seed <= MAX_SEED:
        raise _err(at("seed"), f"seed must be in 0..{MAX_SEED} (what numpy and torch accept), got {seed}")
    return Suite(
        name=name,
        description=description,
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
        extra_evals=extra_evals,
    )


def load_suite(path: str | Path) -> Suite:
    """The suite in file ``path``; a bare name (no directory part, e.g. ``smoke`` or ``smoke.yaml``) that is
    not a file here is the built-in ``suites/<name>[.yaml]``. ConfigError (one line) for anything wrong."""
    p = Path(path)
    if p.name == str(path) and p.name not in ("", ".", "..") and _path_kind(p, "suite file") == "missing":
        builtin = SUITES_DIR / p.name
        alt = builtin if _path_kind(builtin, "suite file") == "file" else builtin.with_suffix(".yaml")
        if _path_kind(alt, "suite file") == "file":
            p = alt
    if _path_kind(p, "suite file") == "missing":
        raise ConfigError(f"suite file {path} not found")
    raw = _read_yaml(p)
    return parse_suite(raw, str(p))


def resolved_yaml(suite: Suite) -> str:
    """The suite with defaults filled in and every method config resolved (for the run dir)."""
    doc: dict[str, Any] = {
        "name": suite.name,
        "description": suite.description,
        "models": suite.models,
        "seed": suite.seed,
        "eval": [e.to_dict() for e in suite.evals] if suite.extra_evals else suite.eval.to_dict(),
        "calibration": suite.calibration.to_dict(),
        "metrics": suite.metrics,
        "tolerances": suite.tolerances,
        **{k: suite.raw[k] for k in ("tasks", "latency") if k in suite.raw},
        "cells": [
            {"name": c.name, "method": [m.config_dict() for m in c.chain], "calibration": c.calibration.to_dict(),
             "metrics": c.metrics, **({"resources": c.resources.to_dict()} if c.resources.to_dict() else {}),
             **({"tasks": c.tasks} if c.tasks else {}), **({"latency": c.latency} if c.latency else {}),
             **({"models": list(c.models)} if c.models is not None else {})}
            for c in suite.cells
        ],
    }
    return yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False)
