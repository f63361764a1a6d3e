"""The Python API (``import quantbench as qb``): the runner's steps one call at a time.

::

    model, tok = qb.load_model("tiny-llama")                     # any model spec, dtype=..., device=...
    calib = qb.calibration("wiki", tok, n_samples=8, seq_len=128)
    q = qb.quantize(copy.deepcopy(model), "gptq", bits=4, group_size=64, calibration=calib)
    records = qb.evaluate(q, tok, metrics=["perplexity", "kl_divergence"], seq_len=128, reference=model)
    df = qb.run("smoke", models=["tiny-llama"], limit=2, out="/tmp/run")   # a suite -> a pandas DataFrame

Every call is built on the entry points the runner uses: :func:`quantbench.methods.quantize.quantize` (the one
quantization path), :func:`quantbench.harness.run.runner.run_suite`, and the metric registry
(:data:`quantbench.harness.measure.METRICS`), so :func:`evaluate`'s records have the runner's schema.
A model loaded here carries its spec and the chain applied to it (``model.quantbench``), which
:func:`evaluate` records and :func:`save` writes next to the packed buffers.

``qb.save(model, dir)`` / ``qb.load(dir)``: a self-describing safetensors checkpoint (no pickle) of a chain of
:data:`SAVEABLE` methods (fp, rtn, gptq, awq, hqq, w8a8, smoothquant, llamacpp, bitnet-ptq/1bit, fp8,
fp8-weight, mxfp4, nvfp4 and the -a4 variants): each quantized module's class and constructor spec
(:class:`~quantbench.methods.base.Saveable`) and its packed tensors (the bytes ``storage()`` counts), plus
every other tensor that differs from the source model, found by comparing with a freshly loaded source at
save time rather than declared by each method, so a fold no method declares (SmoothQuant's and AWQ's norm
scales) cannot be missed. :func:`load` rebuilds the source (checked by fingerprint), the modules, the changed
tensors and the ties; the logits are bit-identical. Other methods raise a ConfigError naming the method.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..methods.base import (
    METHODS,
    MODULE_CLASSES,
    Calibration,
    ConfigError,
    Method,
    QuantizedModule,
    QuantizedTensorModule,
    Saveable,
    build_method,
    dtype_name,
    model_fingerprint,
    set_module,
)
from ..methods.placement import model_device
from ..methods.quantize import quantize as _quantize
from .inputs import data as datamod
from .inputs.data import DATASETS
from .inputs.models import LoadedModel, check_family, family_of, model_key
from .inputs.models import load_model as _load_model
from .measure import METRICS, PARAM_BLOCKS, CellContext, MetricResult
from .measure.evaluate import PROTOCOLS, Reference, build_eval_data
from .run.records import environment, make_record, read_records, utc_now
from .run.runner import run_suite
from .run.suite import Suite, cell_filter, load_suite, parse_suite, preflight_suite, with_models

__all__ = ["load_model", "calibration", "quantize", "evaluate", "run", "methods", "metrics", "records_frame",
           "save", "load"]

log = logging.getLogger(__name__)

#: the attribute a model loaded here carries: {"spec", "info", "chain": [config dicts], "methods": [Method]}
STATE = "quantbench"
#: methods whose result :func:`save` can write: every module they leave is a
#: :class:`~quantbench.methods.base.Saveable` and every other change is to a tensor of the source model
SAVEABLE = ("fp", "rtn", "gptq", "awq", "hqq", "w8a8", "smoothquant", "llamacpp", "bitnet-ptq", "bitnet-1bit",
            "fp8", "fp8-weight", "mxfp4", "nvfp4", "mxfp4-a4", "nvfp4-a4")
FORMAT = "quantbench-packed"
#: 2: any Saveable module (class + spec), changed source tensors and ties; 1 (read only): IntQuantLinear only
VERSION = 2


def _state(model: nn.Module) -> dict[str, Any]:
    st = getattr(model, STATE, None)
    if st is None:
        cfg = getattr(model, "config", None)
        st = {"spec": None, "info": {"name": type(model).__name__, "source": "python object", "sha256": None,
                                     "params": sum(p.numel() for p in model.parameters()),
                                     "source_precision": None, "architecture": getattr(cfg, "model_type", None),
                                     "dtype": dtype_name(next(model.parameters()).dtype),
                                     "device": str(model_device(model))},
              "chain": [], "methods": []}
        object.__setattr__(model, STATE, st)  # a plain attribute (not a submodule), copied by deepcopy
    return st


def load_model(spec: Any, dtype: str | None = None, device: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a model spec (an embedded name, an HF directory, a .gguf file, a hub id
    ``org/name``, or a mapping such as ``{random: llama, hidden_size: 256}``), in ``dtype`` on ``device``."""
    lm = _load_model(spec, dtype, device)
    object.__setattr__(lm.model, STATE, {"spec": spec, "info": dict(lm.info), "chain": [], "methods": []})
    return lm.model, lm.tokenizer


def calibration(dataset: str = "wiki", tokenizer: Any = None, n_samples: int = 32, seq_len: int = 512,
                seed: int = 0) -> Calibration:
    """``n_samples`` seeded windows of ``seq_len`` tokens from ``dataset``'s calibration split (the runner's)."""
    if tokenizer is None:
        raise ConfigError("calibration needs the model's tokenizer (qb.load_model returns it)")
    if dataset not in DATASETS or "calib" not in DATASETS[dataset].splits:
        raise ConfigError(f"dataset {dataset!r} has no calibration split; valid: "
                          f"{', '.join(n for n, c in DATASETS.items() if 'calib' in c.splits)}")
    return datamod.calibration({"dataset": dataset, "n_samples": int(n_samples), "seq_len": int(seq_len)},
                               tokenizer, seed)


def _chain(method: Any, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(method, str):
        return [(method, dict(params))]
    if params:
        raise ConfigError("with a chain, give each method's parameters in the chain: [(name, {params}), ...]")
    if not isinstance(method, (list, tuple)) or not method:
        raise ConfigError(f"method must be a name or a non-empty list of (name, params), got {method!r}")
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in method:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and "method" in entry:
            out.append((entry["method"], dict(entry.get("params") or {})))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str):
            out.append((entry[0], dict(entry[1] or {})))
        else:
            raise ConfigError(f"a chain entry is a name, (name, params) or {{method, params}}, got {entry!r}")
    return out


def quantize(model: nn.Module, method: str | Sequence[Any], calibration: Calibration | None = None, seed: int = 0,
             **params: Any) -> nn.Module:
    """``model`` through a method (``"gptq", bits=4, group_size=128``) or a chain (``[("gptq", {"bits": 4}),
    ("kvquant", {"bits": 4})]``), IN PLACE (pass ``copy.deepcopy(model)`` to keep the original); returns it.

    Everything is checked before any work: the names and parameters, that each method handles the model's
    family, and that a method that calibrates has ``calibration``."""
    chain = _chain(method, params)
    built: list[Method] = [build_method(name, p) for name, p in chain]  # validates names and parameters
    st = _state(model)
    check_family(family_of(model), [m.name for m in built], st["info"].get("name", "the model"))
    missing = [m.name for m in built if m.needs_calibration]
    if missing and calibration is None:
        raise ConfigError(f"{', '.join(missing)} calibrate(s): pass calibration=qb.calibration(dataset, tokenizer, "
                          "n_samples, seq_len)")
    t0 = time.perf_counter()
    model, applied = _quantize(model, built, calibration, seed)
    st = _state(model)
    st["chain"] = [*st["chain"], *({"method": m.name, **m.config.to_dict()} for m in applied)]
    st["methods"] = [*st["methods"], *applied]
    st["quantize_seconds"] = st.get("quantize_seconds", 0.0) + time.perf_counter() - t0
    if calibration is not None and missing:
        st["calibration"] = {k: calibration.meta.get(k) for k in ("dataset", "n_samples", "seq_len")}
    return model


def _params(where: str, blocks: dict[str, Any]) -> dict[str, Any]:
    return {key: block.parse(where, blocks.get(key)) for key, block in PARAM_BLOCKS.items()}


def _measure(name: str, ctx: CellContext) -> list[MetricResult]:
    try:
        res = METRICS[name].compute(ctx)
    except Exception as e:  # recorded, as the runner does
        log.debug("%s", traceback.format_exc())
        return [MetricResult(None, status="failed", error=f"{type(e).__name__}: {e}")]
    for r in res:
        if r.status == "ok" and (r.value is None or (isinstance(r.value, float) and not math.isfinite(r.value))):
            r.status, r.error, r.value = "failed", f"non-finite value {r.value}", None
    return res


def evaluate(model: nn.Module, tokenizer: Any, metrics: Sequence[str] = ("perplexity",), dataset: str = "wiki",
             protocol: str = "gptq", seq_len: int = 512, stride: int | None = None, max_windows: int | None = None,
             reference: nn.Module | None = None, seed: int = 0, tasks: Any = None, latency: Any = None,
             name: str | None = None, batch_size: int = 1) -> list[dict[str, Any]]:
    """Records (the runner's schema, one per metric result) of ``model`` on ``dataset``'s test split.

    ``reference``: the unquantized model for ``kl_divergence``/``top1_agreement`` (None: those are recorded
    ``unavailable``); ``tasks``/``latency``: the suite blocks of the same names; ``batch_size``: perplexity
    windows per forward pass (``provenance.batch_size``; the values are those of batch 1 within 1e-6 relative)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS.names())}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    st = _state(model)
    label = "+".join(c["method"] for c in st["chain"]) or "fp"
    cell = name or label
    params = _params(f"evaluate({cell})", {"tasks": tasks, "latency": latency})
    ids = datamod.tokens(dataset, "test", tokenizer)
    ev = build_eval_data(ids, dataset, protocol, seq_len, stride, max_windows, batch_size)
    env = environment()
    info = st["info"]
    model_info = {"name": info.get("name") if st["spec"] is None else model_key(st["spec"]),
                  **{k: info.get(k) for k in ("source", "sha256", "params", "source_precision", "dtype", "device")}}
    prov = {**env, "seed": seed, "started": utc_now(), "device": info.get("device"), "dtype": info.get("dtype"),
            "api": "qb.evaluate", "batch_size": batch_size}
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="qb-ref-") as tmp:
        ref = None
        if reference is not None:  # every statistic against the unquantized model reads it
            reference.eval()
            ref, _ = Reference.build(reference, ev, Path(tmp) / "reference.npy")
        base = LoadedModel(model, tokenizer, dict(info))
        ctx = CellContext(cell, model, base, ev, ref, list(st["methods"]), float(st.get("quantize_seconds", 0.0)),
                          seed, dict(st.get("calibration") or {}), params, None)
        results = [(m, _measure(m, ctx)) for m in metrics]
    model.train(was_training)
    prov["seconds"] = round(time.perf_counter() - t0, 3)
    configs = st["chain"] or [{"method": "fp", **build_method("fp", {}).config.to_dict()}]
    method_config: Any = configs[0] if len(configs) == 1 else configs
    out = []
    for mname, res in results:
        spec = METRICS[mname]
        for r in res:
            out.append(make_record(run_id=f"api-{prov['started']}", suite="api", cell=cell, model=model_info,
                                   method=label, method_config=method_config, metric=mname, value=r.value,
                                   unit=spec.unit, higher_is_better=spec.higher_is_better, protocol=r.protocol,
                                   stderr=r.stderr, status=r.status, error=r.error, provenance=prov))
    return out


def records_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Records as a tidy DataFrame: one row per record, nested fields flattened to dotted columns
    (``model.name``, ``method_config.bits``, ``provenance.hardware.cpu``, ...)."""
    return pd.json_normalize(list(records), sep=".")


def run(suite: str | Path | dict[str, Any] | Suite, models: Sequence[Any] | None = None, dtype: str | None = None,
        device: str | None = None, seed: int | None = None, limit: int | None = None, out: str | Path | None = None,
        cells: str | Sequence[str] | None = None, resume: bool = False) -> pd.DataFrame:
    """Run a suite (a file, a built-in name such as ``"smoke"``, a suite mapping or a parsed Suite) as
    ``quantbench run`` does and return its records as :func:`records_frame`; ``df.attrs["run_dir"]`` is the run
    directory. ``models``/``dtype``/``device``/``cells`` are ``--model``/``--dtype``/``--device``/``--cells``."""
    if isinstance(suite, Suite):
        s = suite
    elif isinstance(suite, dict):
        s = parse_suite(copy.deepcopy(suite))
    else:
        s = load_suite(suite)
    if models is not None or dtype or device:
        s = with_models(s, list(models) if models is not None else None, dtype, device)
    for problem in preflight_suite(s):  # devices exist and hub ids resolve, before any work
        log.warning("recorded as failed without running: %s", problem)
    pats = [cells] if isinstance(cells, str) else list(cells or [])
    run_dir = run_suite(s, Path(out) if out else None, resume, seed, limit, cell_filter(pats))
    df = records_frame(read_records(run_dir / "records.jsonl"))
    df.attrs["run_dir"] = str(run_dir)
    return df


def methods() -> dict[str, str]:
    """Every registered method: name -> its one-line description."""
    out = {}
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        out[name] = doc.splitlines()[0] if doc else ""
    return out


def metrics() -> dict[str, str]:
    """Every registered metric: name -> its label, unit and direction."""
    out = {}
    for name, spec in sorted(METRICS.items(), key=lambda kv: kv[1].order):
        way = {True: "higher is better", False: "lower is better", None: "no direction"}[spec.higher_is_better]
        out[name] = f"{spec.label} ({spec.unit}; {way})"
    return out


# --------------------------------------------------------------------------- save / load


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost quantized modules (QuantizedModule / QuantizedTensorModule), by name."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantizedModule, QuantizedTensorModule)) and not _under(name, out):
            out[name] = mod
    return out


def _under(key: str, prefixes: dict[str, Any]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _tensor_owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = key.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _source_state(spec: Any, dtype: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The freshly loaded source model's state_dict (on the CPU) and its parameters' fingerprint."""
    src = _load_model(spec, dtype, "cpu").model
    return {k: v.detach() for k, v in src.state_dict().items()}, model_fingerprint(src, exact=False)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write a quantized model as ``quantbench.json`` and ``quantized.safetensors`` (no pickle).

    The JSON records the format version, the source model spec and dtype, the chain (resolved params),
    each quantized module's class and constructor spec (:class:`~quantbench.methods.base.Saveable`), and
    the tied tensors; the safetensors file holds each quantized module's packed tensors (the bytes
    ``model_storage`` counts) and every other tensor that differs from the freshly loaded source model
    (norm weights SmoothQuant/AWQ folded scales into, ...). Supported: chains of :data:`SAVEABLE`."""
    from safetensors.torch import save_file

    st = _state(model)
    if st["spec"] is None:
        raise ConfigError("qb.save needs a model loaded by qb.load_model (its source spec is recorded)")
    for c in st["chain"]:
        if c["method"] not in SAVEABLE:
            raise ConfigError(f"qb.save does not support method {c['method']!r} (it keeps state outside saveable "
                              f"modules); supported: {', '.join(SAVEABLE)}")
    qmods = _quantized_modules(model)
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[int, tuple[str, torch.Tensor]] = {}  # data_ptr -> the first key holding that storage
    for name, mod in qmods.items():
        assert isinstance(mod, Saveable)
        if not mod.saveable():
            raise ConfigError(f"qb.save: {name} is a {type(mod).__name__}, which has no save_spec")
        modules[name] = {"class": type(mod).__name__, "spec": mod.save_spec(), "packed": getattr(mod, "packed", None)}
        for k, t in mod.saved_tensors().items():
            tensors[f"{name}.{k}"] = t.detach().cpu().contiguous()
        for k, t in mod.state_dict(keep_vars=True).items():
            owner.setdefault(t.data_ptr(), (f"{name}.{k}", t))
    src, fingerprint = _source_state(st["spec"], st["info"].get("dtype"))
    ties: dict[str, str] = {}
    changed: list[str] = []
    mine = model.state_dict(keep_vars=True)
    for key, t in mine.items():
        if _under(key, qmods):
            continue
        first = owner.get(t.data_ptr())
        if first is not None and t.numel() and first[1].shape == t.shape and first[1].dtype == t.dtype:
            ties[key] = first[0]  # the same storage as an earlier tensor (a tied lm_head)
            continue
        owner[t.data_ptr()] = (key, t)
        s = src.get(key)
        if s is None:
            raise ConfigError(f"qb.save: {key} is not in the source model (a module the chain added that is not "
                              "a saveable quantized module)")
        if s.shape != t.shape or s.dtype != t.dtype or not torch.equal(s, t.detach().cpu()):
            tensors[key] = t.detach().cpu().contiguous()
            changed.append(key)
    gone = [k for k in src if k not in mine and not _under(k, qmods)]
    if gone:
        raise ConfigError(f"qb.save: the chain removed {gone[0]} from the model; it cannot be rebuilt")
    meta = {"format": FORMAT, "version": VERSION, "source": st["spec"], "dtype": st["info"].get("dtype"),
            "source_fingerprint": fingerprint, "chain": st["chain"], "modules": modules, "changed": changed,
            "ties": ties}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "quantized.safetensors"), metadata={"format": FORMAT})
    meta["sha256"] = hashlib.sha256((d / "quantized.safetensors").read_bytes()).hexdigest()
    (d / "quantbench.json").write_text(json.dumps(meta, indent=1, default=str))
    return d


def _retie(model: nn.Module, key: str, target: torch.Tensor) -> None:
    mod, attr = _tensor_owner(model, key)
    if getattr(mod, attr).data_ptr() == target.data_ptr():
        return  # tied already (as the source model was)
    if isinstance(getattr(mod, attr, None), nn.Parameter):
        setattr(mod, attr, nn.Parameter(target, requires_grad=False))
    else:
        mod.register_buffer(attr, target)


def load(directory: str | Path, device: str | None = None) -> tuple[nn.Module, Any]:
    """A model written by :func:`save`: the source model is loaded from its spec (and checked against the
    recorded fingerprint), each quantized module is rebuilt from its class and spec and filled from the
    safetensors file, and the changed tensors and ties are restored (no calibration is rerun)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        meta = json.loads((d / "quantbench.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{d} holds no readable quantbench.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{d}/quantbench.json is not a {FORMAT} file")
    if meta.get("version") not in (1, VERSION):
        raise ConfigError(f"{d}/quantbench.json: format version {meta.get('version')!r}; this quantbench reads 1 "
                          f"and {VERSION}")
    path = d / "quantized.safetensors"
    if not path.is_file():
        raise ConfigError(f"{d} holds no quantized.safetensors")
    if "sha256" in meta and hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
        raise ConfigError(f"{path} is not the file quantbench.json was written with (sha256 differs)")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{d}/quantized.safetensors cannot be read ({e})") from None
    methods = [build_method(c["method"], {k: v for k, v in c.items() if k not in ("method", "version")})
               for c in meta["chain"]]  # also imports the method files, which define their module classes
    model, tok = load_model(meta["source"], meta.get("dtype"), device)
    if meta["version"] == 1:  # every module an IntQuantLinear, its spec the constructor's arguments
        meta["modules"] = {n: {"class": "IntQuantLinear", "spec": m} for n, m in meta["modules"].items()}
    elif model_fingerprint(model, exact=False) != meta["source_fingerprint"]:
        raise ConfigError(f"{d}: the source model {meta['source']!r} is not the one the checkpoint was saved from "
                          "(its weights changed)")
    dev = model_device(model)
    used: set[str] = set()
    for name, m in meta["modules"].items():
        cls = MODULE_CLASSES.get(m["class"])
        if cls is None or not cls.saveable():
            raise ConfigError(f"{d}: module {name} is a {m['class']!r}, which this quantbench cannot rebuild")
        q = cls.from_spec(m["spec"])
        assert isinstance(q, nn.Module)
        own = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")
               and "." not in k.removeprefix(name + ".")}
        used.update(f"{name}.{k}" for k in own)
        expect = q.state_dict()
        for k, v in own.items():
            if k not in expect or expect[k].dtype != v.dtype or expect[k].shape != v.shape:
                raise ConfigError(f"{d}: tensor {name}.{k} ({v.dtype}, {tuple(v.shape)}) does not fit a "
                                  f"{m['class']} of spec {m['spec']}")
        try:
            q.load_saved(own)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"{d}: module {name} ({m['class']}) cannot be filled: {e}") from None
        if m.get("packed") is not None:
            q.packed = m["packed"]
        set_module(model, name, q.to(dev))
    state = model.state_dict(keep_vars=True)
    for key in meta.get("changed", []):
        if key not in tensors or key not in state or tensors[key].shape != state[key].shape:
            raise ConfigError(f"{d}: tensor {key} is missing from quantized.safetensors or does not fit the model")
        with torch.no_grad():
            state[key].data = tensors[key].to(dev)  # the saved dtype, as the quantized model had it
        used.add(key)
    state = model.state_dict(keep_vars=True)  # the restored tensors: the ties' targets
    for key, target in meta.get("ties", {}).items():
        _retie(model, key, state[target].data)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConfigError(f"{d}: quantized.safetensors holds tensors the metadata does not name: {extra[:3]}")
    st = _state(model)
    st["chain"] = list(meta["chain"])
    st["methods"] = methods
    return model, tok
