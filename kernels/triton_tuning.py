"""Shared launch helpers for the Triton kernels: interpreter detection, autotuning, device facts, and
the split-K machinery of the GEMM kernels (int8, ternary, W4A16): :func:`run_splitk` on the host,
:func:`splitk_epilogue` (bias, store, split-K reduction) inside the kernels.

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
import triton.language as tl


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


def launch_with(tuned: Any, grid: Callable[[dict[str, Any]], Any], same_config: bool, *args: Any, **kw: Any) -> bool:
    """Launch ``tuned`` (an autotuner) with its last config, without autotuning, if ``same_config``
    and it has one; returns whether it did."""
    best = getattr(tuned, "best_config", None)
    if not same_config or best is None:
        return False
    meta = {**best.kwargs, **kw}
    tuned.fn[grid(meta)](*args, **meta, num_warps=best.num_warps, num_stages=best.num_stages)
    return True


def cfg(num_warps: int = 4, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


# -- split-K reduction in one launch --------------------------------------------------------------
#: serial split-K: each program adds its fp32 partial into a persistent zeroed workspace and bumps
#: its tile's counter; the last one writes the output tile and zeroes the workspace and counter.
#: One launch instead of zero-fill + atomic kernel + cast (two torch launches saved per call).
FUSED_SPLITK = True
_WORKSPACES: dict[str, tuple[Any, Any]] = {}
_VERIFIED: dict[tuple[str, str], bool] = {}


def splitk_workspace(device: Any, numel: int, tiles: int) -> tuple[Any, Any] | None:
    """(fp32 workspace >= ``numel``, int32 tile counters >= ``tiles``), all zero between launches.

    None while a CUDA graph is being captured and the buffers would have to grow (a zero-fill
    recorded in a graph would not run until the graph is replayed)."""
    import torch

    key = str(device)
    ws = _WORKSPACES.get(key)
    if ws is None or ws[0].numel() < numel or ws[1].numel() < tiles:
        if getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        n, t = max(numel, ws[0].numel() if ws else 0), max(tiles, ws[1].numel() if ws else 0)
        ws = (torch.zeros(n, dtype=torch.float32, device=device), torch.zeros(t, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


def fused_splitk_state(family: str, device: Any) -> bool | None:
    """True/False once the fused reduction of ``family`` was checked on ``device``; None before."""
    return _VERIFIED.get((family, str(device)))


def record_fused_splitk(family: str, device: Any, ok: bool) -> None:
    if not ok:
        import warnings

        warnings.warn(f"{family}: the one-launch split-K reduction disagreed with the atomic path on {device}; "
                      "using the atomic path", RuntimeWarning, stacklevel=3)  # fmt: skip
    _VERIFIED[(family, str(device))] = ok


def run_splitk(
    family: str, launch: Callable[[Any, Any, Any, int, bool], None], M: int, N: int, out_dtype: Any, device: Any
) -> Any:
    """Run a split-K decode kernel; ``launch(out, ws, cnt, reduce, same_config)`` launches it with
    REDUCE = 2 (one launch, ``out`` in ``out_dtype``) or 1 (atomics into ``out``, a zeroed fp32
    buffer); ``same_config``: with the config the previous launch used (no autotuning).

    The first call per (family, device) runs both and compares them (and checks the workspace was
    left zeroed); a disagreement switches the family to the atomic path for the process."""
    import torch

    state = fused_splitk_state(family, device) if FUSED_SPLITK else False
    capturing = getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_current_stream_capturing()
    ws = None
    if state is True or (state is None and not capturing):
        ws = splitk_workspace(device, M * N, -(-M // 16) * -(-N // 16))
    if ws is not None:
        out = torch.empty(M, N, dtype=out_dtype, device=device)
        launch(out, ws[0], ws[1], 2, False)
        if state is None:
            ref = torch.zeros(M, N, dtype=torch.float32, device=device)
            launch(ref, ref, ref, 1, True)
            tol = 4e-3 * float(ref.abs().max()) + 1e-6
            ok = bool((out.float() - ref).abs().max() <= tol) and not ws[0].any() and not ws[1].any()
            record_fused_splitk(family, device, ok)
            if not ok:
                ws[0].zero_()
                ws[1].zero_()
                return ref.to(out_dtype)
        return out
    out = torch.zeros(M, N, dtype=torch.float32, device=device)
    launch(out, out, out, 1, False)
    return out.to(out_dtype) if out_dtype != torch.float32 else out


def launch_tuned(
    tuned: Any, grid: Callable[[dict[str, Any]], Any], same_config: bool, out: Any, reduce: int, *args: Any, **kw: Any
) -> None:
    """Launch autotuner ``tuned`` with ``REDUCE=reduce`` (reusing its last config if ``same_config``).

    With REDUCE = 1 (atomics into ``out``, a zeroed fp32 buffer) a call that autotuned ran the atomics
    once per benchmark run, so ``out`` is zeroed and the kernel run once more with the chosen config."""
    if launch_with(tuned, grid, same_config, *args, REDUCE=reduce, **kw):
        return
    n_cached = len(tuned.cache)
    tuned[grid](*args, REDUCE=reduce, **kw)
    if reduce == 1 and len(tuned.cache) != n_cached:
        out.zero_()
        tuned[grid](*args, REDUCE=reduce, **kw)


@triton.jit
def splitk_epilogue(
    y,
    bias_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    offs_m,
    offs_n,
    M,
    N,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """Finish the fp32 [BLOCK_M, BLOCK_N] tile ``y`` of program (tile ``program_id(0)``, K split
    ``program_id(1)``) at rows ``offs_m`` and columns ``offs_n`` of c [M, N].

    Adds ``bias[n]`` (K split 0 only) if HAS_BIAS, then: SPLIT_K == 1 stores in c's dtype; REDUCE == 2
    adds into the fp32 workspace ``ws`` [M, N] and the tile's last program to finish stores the sum
    in c's dtype and zeroes its workspace tile and counter ``cnt[program_id(0)]``; else (REDUCE == 1)
    adds into c, a zeroed fp32 buffer, with atomics."""
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (tl.program_id(1) == 0).to(tl.float32)
        y += bias[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=c_mask)
    elif REDUCE == 2:  # the tile's last program to finish writes it (one launch, no zero-fill / cast)
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, y, mask=c_mask, sem="relaxed")
        tl.debug_barrier()  # all of this program's partial is in before its tile counter moves
        pid = tl.program_id(0)
        if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(y), mask=c_mask, sem="acquire")  # read at L2
            total = tl.where(c_mask, total, 0.0)
            tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.store(ws_ptrs, tl.zeros_like(y), mask=c_mask)  # leave the workspace and counter zeroed
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")
    else:
        tl.atomic_add(c_ptrs, y, mask=c_mask, sem="relaxed")  # c is a zeroed fp32 buffer


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles share weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows
