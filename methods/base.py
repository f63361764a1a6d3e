"""Method protocol, config base, storage accounting and the lazy method registry.

A method is a class with a ``name``, a frozen versioned config dataclass, a
``needs_calibration`` flag and ``quantize(model, calib) -> model``.  Methods register
themselves with :func:`register` in their own file and nowhere else (:data:`METHODS`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import numbers
import os
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, cast

import torch
from torch import nn

from .registry import ConfigError, Registry, did_you_mean, load_plugins
from .timing import greedy_decode

T = TypeVar("T")

__all__ = ["ConfigError", "did_you_mean", "load_plugins"]


def cache_dir() -> Path:
    """quantbench's on-disk cache (``$QUANTBENCH_CACHE``, default ``~/.cache/quantbench``), created on use."""
    d = Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: frozen, validated in ``__post_init__``, versioned."""

    version: ClassVar[int] = 1

    def __post_init__(self) -> None:  # subclasses call super().__post_init__() then validate
        pass

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, method: str, params: dict[str, Any] | None) -> MethodConfig:
        """The config of ``params`` (names and values as a suite gives them), each value checked against its
        field's annotation (:func:`check_field_type`) before ``__post_init__`` checks its range."""
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{method}: params must be a mapping, got {params!r}")
        params = dict(params or {})
        valid = cls.param_names()
        for key in params:
            if not isinstance(key, str):
                raise ConfigError(f"{method}: a parameter name is a string, got {key!r}")
            if key not in valid:
                raise ConfigError(f"unknown parameter '{key}' for {method}{did_you_mean(key, valid)}")
        types_ = field_types(cls)
        for key, value in params.items():
            if key in types_:
                check_field_type(method, key, value, types_[key])
        try:
            return cls(**params)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad parameters for {method}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["version"] = self.version
        return d


def field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's fields and their annotations, resolved (``from __future__ import annotations``
    leaves strings); {} when an annotation cannot be resolved (a plugin's exotic type: values unchecked)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except (OverflowError, TypeError, ValueError):
        return False


def matches_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as YAML or JSON gives it) fits the annotation ``tp``: a bool is a real bool, an int
    is not a bool, a float is a finite number (an int too), a ``tuple[X, ...]`` is a list (or tuple) of X,
    ``Literal[...]`` one of its values, ``X | None`` None or X; an annotation not understood accepts anything."""
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return any(matches_type(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)) or (origin is list and not isinstance(value, list)):
            return False
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return not args or all(matches_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches_type(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            return False
        k, v = args if len(args) == 2 else (Any, Any)
        return all(matches_type(a, k) and matches_type(b, v) for a, b in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


_NOUNS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}


def describe_type(tp: Any) -> str:
    """``tp`` in words, for an error message: "an integer", "a list of strings", "an integer or null"."""
    if tp in _NOUNS:
        return _NOUNS[tp][0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple or origin is list:
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return f"a list of {_NOUNS[item][1]}" if item in _NOUNS else "a list"
        return f"a list of {len(args)} items ({', '.join(describe_type(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    return f"a {getattr(tp, '__name__', tp)}"


def check_field_type(method: str, param: str, value: Any, tp: Any) -> None:
    """ConfigError ``"rtn: bits must be an integer, got 4.5"`` unless ``value`` fits ``tp`` (:func:`matches_type`)."""
    if not matches_type(value, tp):
        raise ConfigError(f"{method}: {param} must be {describe_type(tp)}, got {value!r}")


def check_choice(method: str, param: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{method}: {param}={value!r} is not valid; valid: {choices}")


# --------------------------------------------------------------------------- storage


@dataclass
class Storage:
    """Bytes a module really occupies, by component (computed from real buffers)."""

    packed_weights: int = 0
    scales_zeros: int = 0
    outliers: int = 0
    unquantized: int = 0
    quantized_weights: int = 0  # number of weight *elements* represented by packed_weights

    @property
    def total(self) -> int:
        return self.packed_weights + self.scales_zeros + self.outliers + self.unquantized

    def __add__(self, other: Storage) -> Storage:
        return Storage(
            self.packed_weights + other.packed_weights,
            self.scales_zeros + other.scales_zeros,
            self.outliers + other.outliers,
            self.unquantized + other.unquantized,
            self.quantized_weights + other.quantized_weights,
        )


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors if t is not None)


# --------------------------------------------------------------------------- save/load protocol

#: every quantized module class, by class name (filled by :class:`Saveable` as the classes are defined): the
#: classes a saved checkpoint names (``quantbench.harness.api.load`` rebuilds its modules from here)
MODULE_CLASSES: dict[str, type[Saveable]] = {}


class Saveable:
    """How a quantized module is written to and rebuilt from a self-describing checkpoint (no pickle).

    A class that can be saved overrides :meth:`save_spec` (JSON-able constructor arguments; a dtype as its
    name under ``"dtype"``); :meth:`from_spec` builds an empty instance of the same shapes (default:
    ``cls(**spec)``), then :meth:`load_saved` fills it from :meth:`saved_tensors` (default: the state_dict;
    a class leaves out what it derives from the rest, so the saved bytes are ``storage()``'s).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODULE_CLASSES[cls.__name__] = cls

    @classmethod
    def saveable(cls) -> bool:
        return cls.save_spec is not Saveable.save_spec

    def save_spec(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no save_spec")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Saveable:
        kw = dict(spec)
        if isinstance(kw.get("dtype"), str):
            kw["dtype"] = getattr(torch, kw["dtype"])
        return cls(**kw)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return dict(cast(nn.Module, self).state_dict())

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        cast(nn.Module, self).load_state_dict(tensors, strict=True)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (a spec's JSON form of a dtype)."""
    return str(dtype).removeprefix("torch.")


def bias_dtype_name(bias: torch.Tensor | None) -> str:
    """:func:`dtype_name` of a module's bias, float32 without one (the ``dtype`` of float-bias modules' specs)."""
    return dtype_name(bias.dtype if bias is not None else torch.float32)


class QuantizedModule(Saveable, nn.Module):
    """Base for modules that replace ``nn.Linear`` with quantized storage.

    Subclasses keep the real packed buffers and implement ``storage()``.  ``in_features``
    and ``out_features`` mirror ``nn.Linear``.  ``packed`` selects the packed kernel
    (True) or the simulated dequantized path (False) where a format has both.
    """

    in_features: int
    out_features: int
    packed: bool = True

    def storage(self) -> Storage:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The weight the module computes with, as a dense [out, in] float tensor."""
        raise NotImplementedError

    def kernel_path(self, device: torch.device) -> str:
        """``"native"`` when this module's forward on ``device`` runs its format's own kernel (the packed codes
        into the GEMM the format is made for), ``"reference"`` when it dequantizes to a dense float weight (or
        simulates the format) and runs a float GEMM: its latency is then quantbench's, not the format's.
        Default: native when packed."""
        return "native" if self.packed else "reference"


class QuantizedTensorModule(Saveable, nn.Module):
    """Base for quantized non-linear tensors (embeddings, lm_head) counted in ``model_storage``'s "other".

    ``storage()`` reports the real packed bytes; the module's own buffers (e.g. a dequantized copy used
    by a gather) are not counted again.
    """

    def storage(self) -> Storage:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Calibration data: ``tokens`` is a LongTensor [n_samples, seq_len], seeded, disjoint from eval."""

    tokens: torch.Tensor
    dataset: str
    seed: int
    tokenizer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: captures computed from these tokens, shared by the cells of a run that hold the same Calibration
    #: (the runner keeps one per calibration spec): see :meth:`memoized`
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def batches(self, batch_size: int = 1) -> Iterator[torch.Tensor]:
        for i in range(0, self.tokens.shape[0], batch_size):
            yield self.tokens[i : i + batch_size]

    def memoized(self, key: Any, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` for these tokens.

        The key must name everything the result depends on besides the tokens, the model's exact
        weights above all (:func:`model_fingerprint`): two cells of a run that start from the same fp
        model then share one calibration pass (naive W8A8's and SmoothQuant's activation statistics).
        The caller copies a result it will modify.
        """
        if key not in self.memo:
            self.memo[key] = compute()
        return cast(T, self.memo[key])


# --------------------------------------------------------------------------- methods


class Method(ABC):
    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    needs_calibration: ClassVar[bool] = False
    #: what the method quantizes: "weights", "activations" and/or "kv", joined by "+" (e.g.
    #: "weights+activations"); ask with :meth:`quantizes`, never by the class or method name
    target: ClassVar[str] = "weights"
    #: the engine that serves this method's format when quantbench's own forward is only a reference
    #: path for it (e.g. "llama.cpp"); None: quantbench's kernels are the format's kernels
    serving_engine: ClassVar[str | None] = None

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        #: anything the method wants recorded (allocation, loss curve path, diagnostics)
        self.artifacts: dict[str, Any] = {}
        #: where the method may keep files (checkpoints, curves); set by the runner, may be None
        self.artifact_dir: Path | None = None

    @classmethod
    def quantizes(cls, part: str) -> bool:
        """Whether the method quantizes ``part``: "weights", "activations" or "kv"."""
        return part in cls.target.split("+")

    @abstractmethod
    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        """Transform ``model`` (a fresh copy the method may modify in place) and return it."""

    # -- a KV-cache method (``quantizes("kv")``) owns its cache and that cache's byte formula

    def make_cache(self, model: nn.Module) -> Any:
        """The real cache ``model`` (quantized by this method) generates with; it reports ``kv_bytes()``."""
        raise NotImplementedError(f"{self.name} does not quantize the KV cache")

    def generate(self, model: nn.Module, input_ids: torch.Tensor, n_new: int, cache: Any,
                 times: list[float] | None = None) -> torch.Tensor:
        """Greedy decoding through ``cache`` with the one decode timer (:func:`timing.greedy_decode`);
        a method whose modules must be switched to fill its cache overrides this."""
        return greedy_decode(model, input_ids, n_new, cache, times)

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        """Bytes of the cache :meth:`make_cache` builds, by component (codes, scales, outliers, fp16,
        static, total), for a model shape and ``tokens`` of context (``kvcalc`` sums them up)."""
        raise NotImplementedError(f"{self.name} does not quantize the KV cache")


#: every method, by name; a method file registers its class with ``@register`` and nothing else.
#: The registry imports the modules of this package on first lookup (and ``$QUANTBENCH_PLUGINS``).
METHODS: Registry[type[Method]] = Registry("method", discover=[__package__ or "quantbench.methods"])


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``@register`` on a Method subclass with ``name`` and ``config_cls``."""
    return METHODS.add(cls.name, cls)


def available_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    cls = get_method(name)
    return cls(cls.config_cls.from_dict(name, params))


# --------------------------------------------------------------------------- module selection


DEFAULT_SKIP = ("lm_head", "*embed*", "*wte*", "*wpe*")


def iter_linears(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = DEFAULT_SKIP
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield (qualified name, module) for every ``nn.Linear`` matching the glob patterns.

    Embeddings and lm_head are excluded by default (``exclude``); patterns match the full
    qualified name or its last component.
    """
    include, exclude = list(include), list(exclude)

    def match(name: str, pats: list[str]) -> bool:
        last = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in pats)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and match(name, include) and not match(name, exclude):
            yield name, mod


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_linears(model: nn.Module, selection: ModuleSelection, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every linear the selection picks (:func:`iter_linears`) by ``make(linear)``; returns how many."""
    n = 0
    for name, lin in list(iter_linears(model, selection.include, selection.exclude)):
        set_module(model, name, make(lin))
        n += 1
    return n


def model_storage(model: nn.Module) -> dict[str, Storage]:
    """Storage of the whole model: ``{"linear": ..., "other": ..., "total": ...}``.

    ``linear`` covers the transformer's linear layers (quantized or not, lm_head and
    embeddings excluded); ``other`` covers every remaining parameter (embeddings, norms,
    lm_head), counted once even when tied.
    """
    linear = Storage()
    counted: set[int] = set()
    quantized_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in quantized_prefixes):
            continue
        if isinstance(mod, QuantizedModule):
            linear = linear + mod.storage()
            quantized_prefixes.append(name)
            for t in list(mod.parameters()) + list(mod.buffers()):
                counted.add(t.data_ptr())
        elif isinstance(mod, nn.Linear) and "lm_head" not in name:
            n = tensor_bytes(mod.weight, mod.bias)
            linear = linear + Storage(unquantized=n)
            for t in mod.parameters():
                counted.add(t.data_ptr())
    other = Storage()
    for mod in model.modules():
        if isinstance(mod, QuantizedTensorModule):
            other = other + mod.storage()
            for t in list(mod.parameters()) + list(mod.buffers()):
                counted.add(t.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in counted or t.numel() == 0:
            continue
        counted.add(t.data_ptr())
        if t.is_floating_point() and t.dim() >= 1:
            other = other + Storage(unquantized=tensor_bytes(t))
    return {"linear": linear, "other": other, "total": linear + other}


def linear_weight_count(model: nn.Module) -> int:
    """Number of weight elements in the transformer's linear layers (quantized or not)."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedModule):
            n += mod.in_features * mod.out_features
        elif isinstance(mod, nn.Linear) and "lm_head" not in name:
            n += mod.weight.numel()
    return n


# --------------------------------------------------------------------------- config mixin: module selection

_SELECTION = ("include", "exclude")


@dataclass(frozen=True, kw_only=True)
class ModuleSelection(MethodConfig):
    """A method config that quantizes a selection of linears: ``include``/``exclude`` glob patterns.

    The patterns are those of :func:`iter_linears` (embeddings and lm_head excluded by default); any
    list of strings is accepted and stored as a tuple.  The fields are keyword-only, and
    :meth:`param_names` / :meth:`to_dict` list them after the method's own parameters.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in _SELECTION:
            patterns = getattr(self, key)
            if isinstance(patterns, str):
                raise ConfigError(f"{key} must be a list of glob patterns, got the string {patterns!r}")
            object.__setattr__(self, key, tuple(patterns))

    @classmethod
    def param_names(cls) -> list[str]:
        return [n for n in super().param_names() if n not in _SELECTION] + list(_SELECTION)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {**{n: d[n] for n in self.param_names()}, "version": d["version"]}


# --------------------------------------------------------------------------- model fingerprint


def model_fingerprint(model: nn.Module, exact: bool = True) -> str:
    """A 16-hex sha256 of the model's tensors, in order, each storage once (tied weights count once).

    ``exact=True``: every parameter AND buffer by name, dtype, shape and raw bytes, so it identifies
    everything a forward computes with, quantized modules' packed buffers included (kvquant reuses a
    calibration recording only for the same fingerprint).  ``exact=False``: the parameters only, by name
    and fp32 value: the weights of an unquantized model (the key of the on-disk sensitivity cache).
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    if exact:
        tensors += list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        v = t.detach().cpu().contiguous()
        if exact:
            h.update(f"{name}:{tuple(v.shape)}:{v.dtype};".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(name.encode())
            h.update(v.float().numpy().tobytes())
    return h.hexdigest()[:16]
