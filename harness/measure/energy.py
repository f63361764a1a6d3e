"""Energy counters: NVML's total-energy counter on NVIDIA GPUs, RAPL powercap on CPUs.

A counter is read before and after a window of work of at least ``MIN_WINDOW_S`` seconds (the
counters update every few ms to tens of ms; short windows are noise).  RAPL's ``energy_uj``
wraps at ``max_energy_range_uj``; a reading lower than the previous one adds that range.
Where no counter is readable the metric is ``status: unavailable`` with the reason — never a
number from a power model.  Roots and the NVML module are injectable for tests.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...methods.placement import model_device
from . import latency
from .base import CellContext, MetricResult, metric

log = logging.getLogger(__name__)

MIN_WINDOW_S = 1.0
RAPL_ROOT = Path("/sys/class/powercap")
_PKG = re.compile(r"^intel-rapl:\d+$")  # package domains only (sub-domains are inside them)


class RaplCounter:
    """Sum of the package-level RAPL domains' ``energy_uj``, with wraparound handling."""

    name = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self.domains = sorted(d for d in Path(root).iterdir() if _PKG.match(d.name))
        if not self.domains:
            raise RuntimeError(f"no intel-rapl:N package domains under {root}")
        self.ranges = [int((d / "max_energy_range_uj").read_text()) for d in self.domains]
        self.last = [self._raw(d) for d in self.domains]
        self.total_uj = 0

    @staticmethod
    def _raw(d: Path) -> int:
        return int((d / "energy_uj").read_text())

    def read(self) -> float:
        """Joules accumulated since construction (monotonic across wraparounds)."""
        for i, d in enumerate(self.domains):
            now = self._raw(d)
            delta = now - self.last[i]
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += self.ranges[i] + 1
            self.total_uj += delta
            self.last[i] = now
        return self.total_uj / 1e6


class NvmlCounter:
    """``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load) of one GPU."""

    name = "nvml"

    def __init__(self, nvml: Any = None, index: int = 0) -> None:
        if nvml is None:
            import pynvml as nvml  # type: ignore[import-not-found,no-redef]  # deferred: pynvml is optional
        self.nvml = nvml
        nvml.nvmlInit()
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.start = self._mj()

    def _mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def read(self) -> float:
        return (self._mj() - self.start) / 1e3


def find_counter(device: str = "cpu", rapl_root: Path = RAPL_ROOT, nvml: Any = None
                 ) -> tuple[Any | None, str | None]:
    """(counter, None) or (None, reason) for ``device`` ("cuda" -> NVML, else RAPL)."""
    if device.startswith("cuda"):
        try:
            idx = int(device.split(":")[1]) if ":" in device else 0
            return NvmlCounter(nvml, idx), None
        except ImportError:
            return None, "pynvml is not installed (pip install nvidia-ml-py)"
        except Exception as e:
            return None, f"NVML total-energy counter not readable: {type(e).__name__}: {e}"
    try:
        return RaplCounter(rapl_root), None
    except FileNotFoundError:
        return None, f"no RAPL powercap counters ({rapl_root} absent) and no GPU on this machine"
    except PermissionError:
        return None, f"RAPL counters under {rapl_root} are not readable by this user (root-only since Linux 5.10)"
    except (RuntimeError, OSError, ValueError) as e:
        return None, f"RAPL counters unusable: {e}"


def measure(counter: Any, fn: Callable[[], int], min_seconds: float = MIN_WINDOW_S,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Call ``fn`` (returns tokens processed) until ``min_seconds`` passed; joules and tokens."""
    e0, t0, tokens, calls = counter.read(), time.perf_counter(), 0, 0
    while True:
        tokens += fn()
        calls += 1
        if sync:
            sync()
        if time.perf_counter() - t0 >= min_seconds:
            break
    seconds, joules = time.perf_counter() - t0, counter.read() - e0
    return {"joules": joules, "tokens": tokens, "seconds": seconds, "calls": calls,
            "j_per_token": joules / max(tokens, 1), "watts": joules / seconds}


@metric("energy_j_per_token", label="J/tok", unit="J/token", higher_is_better=False, order=11,
        tolerance={"rel": 0.20}, hardware_bound=True, params="latency")
def energy_j_per_token(ctx: CellContext, rapl_root: Path = RAPL_ROOT, nvml: Any = None) -> list[MetricResult]:
    """Decode J/token (value) and prefill J/token (protocol), windows of >= 1 s each, of the
    ``latency:`` block's workloads."""
    dev = str(model_device(ctx.model))
    counter, reason = find_counter(dev, rapl_root, nvml)
    if counter is None:
        return [MetricResult(None, {"device": dev}, status="unavailable", error=reason)]
    engine = next((m.serving_engine for m in ctx.methods if m.serving_engine), None)
    if engine is not None:
        return [MetricResult(None, {"device": dev, "engine": engine}, status="unavailable",
                             error=f"this format is served by {engine}; quantbench's reference forward for it "
                                   "would not measure the format's energy")]
    p = ctx.params["latency"]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else None
    prefill_fn, decode_fn = latency.workloads(ctx, p)
    pre = measure(counter, prefill_fn, MIN_WINDOW_S, sync)
    dec = measure(counter, decode_fn, MIN_WINDOW_S, sync)
    return [MetricResult(dec["j_per_token"], {
        "counter": counter.name, "device": dev, "phase": "decode", "decode": dec, "prefill": pre,
        "prefill_j_per_token": pre["j_per_token"], "min_window_s": MIN_WINDOW_S,
        "scope": "whole package/GPU (includes other processes' draw)", **dataclasses.asdict(p)})]
