"""The one decode timer: greedy decoding through a KV cache, each step timed alone.

The latency metrics (``harness/measure/latency.py``), KV methods' ``generate`` hooks and the KV
decode benchmark (``kvquant.decode_ms_per_token``) all decode through :func:`greedy_decode`.
On CUDA every timed step is measured between two CUDA events (:func:`timed`).

:class:`StaticDecoder` is the opt-in compiled mode (``latency: {compile: true}``): the same greedy
loop through transformers' ``StaticCache`` (fixed-size K/V tensors updated in place, so the step's
shapes never change) with the one-token step ``torch.compile``\\ d once (``fullgraph``; on CUDA in
``reduce-overhead`` mode, i.e. CUDA graphs; on CPU in inductor's default mode, which is what
``reduce-overhead`` means there).  The prefill stays eager.  The first steps, which trace and
compile, are untimed warm-up; their seconds are kept apart (``compile_s``).  The timed steps run with
dynamo's guard evaluation skipped (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: the one
compiled graph is the only candidate; the guards cover every parameter of the model).  A model whose step
cannot be traced or compiled decodes through the eager loop and DynamicCache instead, with the
reason kept (``fallback``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .placement import model_device

#: untimed steps that trace and compile the step (the second one checks that no recompilation is left)
COMPILE_WARMUP_STEPS = 2


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    dev: torch.device, fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter
) -> tuple[Any, float]:
    """``fn()`` and its seconds: on CUDA (with the default wall clock) between two CUDA events recorded on the
    current stream (the device's own time of the queued work, no host timer in it); elsewhere between two
    ``clock`` reads, with the device synchronized before and after."""
    if dev.type == "cuda" and clock is time.perf_counter:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3  # elapsed_time is in ms
    sync(dev)
    t = clock()
    out = fn()
    sync(dev)
    return out, clock() - t


def timer_name(dev: torch.device, clock: Callable[[], float] = time.perf_counter) -> str:
    """What :func:`timed` measures with on ``dev`` (recorded in latency protocols)."""
    if dev.type == "cuda" and clock is time.perf_counter:
        return "cuda events"
    return getattr(clock, "__name__", "clock")


def _greedy_step(fwd: Callable[..., Any], token: torch.Tensor, cache: Any) -> torch.Tensor:
    """One decode step's forward and its greedy next token."""
    return fwd(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    n_new: int,
    cache: Any,
    times: list[float] | None = None,
    step: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> torch.Tensor:
    """Prefill ``input_ids`` into ``cache``, then ``n_new`` greedy steps of one token each.

    Returns the ids with the new tokens appended; each step's seconds (forward and argmax) are
    appended to ``times`` when given.  ``step`` runs the one-token steps (default: ``model`` itself;
    :class:`StaticDecoder` passes its compiled forward); the prefill always runs ``model``.  ``clock`` reads
    the time (wall seconds; ``time.thread_time`` gives the calling thread's CPU seconds instead).
    """
    input_ids = input_ids.to(model_device(model))  # prompts may be built on the CPU
    dev = input_ids.device
    fwd = model if step is None else step
    out = model(input_ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    ids = input_ids
    for _ in range(n_new):
        ids = torch.cat([ids, nxt], 1)
        nxt, sec = timed(dev, functools.partial(_greedy_step, fwd, nxt, cache), clock)
        if times is not None:
            times.append(sec)
    return ids


def compile_mode(device: torch.device) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA; inductor's ``default`` elsewhere: CUDA graphs do not exist on
    CPU, so ``reduce-overhead`` is the default mode there; ``max-autotune-no-cudagraphs`` adds GEMM autotuning
    at compile time (not measured here); inductor's ``cpp_wrapper`` option (``StaticDecoder(options=...)``)
    measured no faster on smollm2-135m (``scripts/decode_bench.py --cpp-wrapper``) and compiled 4-16x longer."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class StaticDecoder:
    """Greedy decoding of ``model`` through one reused ``StaticCache`` of ``max_len`` tokens, the one-token
    step compiled on first use (``compile=False``: the same static cache, eager step).

    :meth:`decode` has :func:`greedy_decode`'s contract; the cache is reset at each call, so a prompt plus
    its new tokens must fit in ``max_len``.  After the first call: ``compile_s`` holds the seconds of the
    untimed warm-up steps that compiled the step, ``fallback`` the reason the eager loop (DynamicCache)
    ran instead, or None.  Compiling resets torch's dynamo caches (each cell's model is a new object, and
    dynamo stops recompiling one function after a few models), so one StaticDecoder compiles at a time.
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True, mode: str | None = None,
                 fullgraph: bool = True, skip_guards: bool = True, options: dict[str, Any] | None = None) -> None:
        self.model, self.max_len, self.compile = model, max_len, compile
        self.mode, self.fullgraph, self.skip_guards, self.options = mode, fullgraph, skip_guards, options
        self.cache: Any = None
        self.step: Callable[..., Any] | None = None
        self.compile_s: float | None = None
        self.fallback: str | None = None
        self._ready = False

    def protocol(self) -> dict[str, Any]:
        """What the latency record states about this decoding."""
        return {"decode_mode": "eager" if self.fallback else ("compiled" if self.compile else "static-eager"),
                "cache": "DynamicCache" if self.fallback else "StaticCache",
                "compile_mode": self.mode if self.compile else None, "compile_options": self.options,
                "compile_s": self.compile_s, "compile_warmup_steps": COMPILE_WARMUP_STEPS if self.compile else 0,
                "guard_eval": "skipped" if self.compile and self.skip_guards and not self.fallback else "default",
                "compile_fallback": self.fallback}

    def _prepare(self, input_ids: torch.Tensor) -> None:
        from transformers.cache_utils import StaticCache

        dev = input_ids.device
        if self.options is None:
            self.mode = self.mode or compile_mode(dev)
        try:
            config: Any = self.model.config
            self.cache = StaticCache(config=config, max_cache_len=self.max_len)
            if self.compile:
                torch._dynamo.reset()
                self.step = torch.compile(self.model.forward, mode=self.mode, options=self.options,
                                          fullgraph=self.fullgraph, dynamic=False)
                n = min(COMPILE_WARMUP_STEPS, self.max_len - input_ids.shape[1])
                sync(dev)
                t = time.perf_counter()
                self.cache.reset()
                greedy_decode(self.model, input_ids, max(n, 1), self.cache, step=self.step)
                sync(dev)
                self.compile_s = time.perf_counter() - t
        except Exception as e:  # any trace or compile failure falls back, with its reason recorded
            msg = str(e).strip().splitlines()
            self.fallback = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
            self.cache, self.step = None, None
            torch._dynamo.reset()
        self._ready = True

    def decode(self, input_ids: torch.Tensor, n_new: int, times: list[float] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> torch.Tensor:
        """Prefill ``input_ids``, then ``n_new`` greedy steps (each timed into ``times``); returns the ids."""
        from transformers.cache_utils import DynamicCache

        if input_ids.shape[1] + n_new > self.max_len:
            raise ValueError(f"{input_ids.shape[1]} + {n_new} tokens do not fit the static cache of {self.max_len}")
        if not self._ready:
            self._prepare(input_ids)
        if self.fallback is not None:
            return greedy_decode(self.model, input_ids, n_new, DynamicCache(), times, clock=clock)
        self.cache.reset()
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.compile and self.skip_guards):
            return greedy_decode(self.model, input_ids, n_new, self.cache, times, step=self.step, clock=clock)
