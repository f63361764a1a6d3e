"""One quantization path: a model through a method chain, calibrated where a method needs it.

:func:`quantize` serves the runner, ``quantbench export``, the lm-eval wrapper and the Python API::

    model, methods = quantize(copy.deepcopy(base), [("gptq", {"bits": 3}), ("kvquant", {"bits": 4})], calib, seed=0)

Per-module plans (:data:`ModulePlan`, ``{module name: (bits, group_size)}``) let one method quantize
each module at its own setting (``GPTQ.quantize(model, calib, plan=...)``, ``RTN.quantize(...)``):
mixed precision allocates a plan and hands it to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from .base import Calibration, ConfigError, Method, MethodConfig, build_method

#: a chain entry: a built method, or (registered name, params) to build one
ChainEntry = Method | tuple[str, Mapping[str, Any] | None]

#: per-module settings ``{qualified module name: (bits, group_size)}``; ``None`` leaves the module as it is
ModulePlan = Mapping[str, tuple[int, int] | None]

C = TypeVar("C", bound=MethodConfig)
T = TypeVar("T")


def layer_progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "layer") -> Iterator[T]:
    """Per-layer (per-block) progress of a method: a transient bar on a terminal's stderr, and nothing at
    all when stderr is not a TTY (tqdm's ``disable=None``), so logs never get per-layer lines."""
    return iter(tqdm(items, desc=desc, total=total, leave=False, disable=None, unit=unit))


def quantize(
    model: nn.Module,
    chain: Sequence[ChainEntry],
    calibration: Calibration | Callable[[], Calibration] | None = None,
    seed: int | None = 0,
    artifact_dir: Path | None = None,
) -> tuple[nn.Module, list[Method]]:
    """Apply ``chain`` to ``model`` in order; returns (the quantized model, the methods that ran).

    Methods modify the model in place: pass a fresh copy when the original must survive.

    1. ``torch.manual_seed(seed)``, once, before the first method (``None``: the global RNG is left as
       it is), so methods that draw random numbers draw the same ones for the same seed;
    2. each entry is used as it is (a :class:`Method`) or built from ``(name, params)``;
    3. only a method with ``needs_calibration`` gets ``calibration``; a zero-argument callable is called
       once, when the first such method comes, so a chain that needs none tokenizes nothing;
    4. with ``artifact_dir``, each method's ``artifact_dir`` is ``artifact_dir / <its name in the chain>``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    calib: Calibration | None = None
    methods: list[Method] = []
    for entry in chain:
        if isinstance(entry, Method):
            m, name = entry, entry.name
        else:
            name, params = entry
            m = build_method(name, dict(params or {}))
        if artifact_dir is not None:
            m.artifact_dir = Path(artifact_dir) / name
        if m.needs_calibration and calib is None and calibration is not None:
            calib = calibration if isinstance(calibration, Calibration) else calibration()
        model = m.quantize(model, calib if m.needs_calibration else None)
        methods.append(m)
    return model, methods


def module_configs(config: C, names: Iterable[str], plan: ModulePlan | None, method: str) -> dict[str, C]:
    """The config of each selected module: ``config`` with the plan's ``(bits, group_size)`` where the plan
    names the module, ``config`` itself where it does not; modules planned as ``None`` are left out.

    Each planned setting is validated as the method's own config would be; a plan entry that names no
    selected module is an error (a misspelt name would otherwise be ignored).
    """
    names = list(names)
    plan = dict(plan or {})
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise ConfigError(f"{method}: the plan names modules that are not selected linears: {', '.join(unknown[:5])}")
    by_setting: dict[tuple[int, int], C] = {}
    out: dict[str, C] = {}
    for n in names:
        if n not in plan:
            out[n] = config
        elif plan[n] is not None:
            bits, group_size = plan[n]  # type: ignore[misc]  # None is handled above
            key = (int(bits), int(group_size))
            if key not in by_setting:
                by_setting[key] = dataclasses.replace(config, bits=key[0], group_size=key[1])  # type: ignore[call-arg]
            out[n] = by_setting[key]
    return out
