"""Shared launch helpers for the Triton kernels: interpreter detection, autotuning, device facts.

On a GPU each kernel family is wrapped in ``triton.autotune`` over a short config list keyed on an
M bucket and the problem's N and K (so every new decode / prefill shape is benchmarked once, a few
tens of milliseconds per config).  Under ``TRITON_INTERPRET=1`` (the CPU tests) no autotuning
happens: the caller launches the raw kernel with the first config, so the tests stay fast and
deterministic.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(m: int) -> int:
    """Autotune key for the row count: 16 (decode) up to 4096, in powers of two."""
    b = 16
    while b < m and b < 4096:
        b *= 2
    return b


@functools.lru_cache(maxsize=8)
def sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: Any) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 8 on the CPU / interpreter)."""
    if getattr(device, "type", "cpu") != "cuda":
        return 8
    import torch

    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _fast_bench(fn: Callable[[], Any], quantiles: Any = None) -> Any:
    # short runs: the tuning of every (M bucket, N, K) key must fit in the gpu-check's time budget
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotune(configs: Sequence[triton.Config], key: list[str], **kw: Any) -> Callable[[Any], Any]:
    """``triton.autotune`` with short benchmark runs (where this Triton accepts ``do_bench``)."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kw.setdefault("do_bench", _fast_bench)
    return triton.autotune(configs=list(configs), key=key, **kw)


def cfg(num_warps: int = 4, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)
