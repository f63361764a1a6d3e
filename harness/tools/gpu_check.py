"""`quantbench gpu-check`: validate and time every Triton kernel in one short run (issue J).

On a machine with one NVIDIA GPU it
1. checks each Triton kernel against its torch reference on fresh random inputs at realistic shapes
   (fp16/bf16 activations): relative error ||out - ref|| / ||ref|| and max error, the output
   poisoned with NaN before each run so an unwritten element fails;
2. times each kernel against cuBLAS fp16 at decode (M = 1, 4, 16) and prefill (M = 512, 2048) shapes
   for 4096x4096, 4096x14336 and 14336x4096 (median of CUDA-event timings after warm-up, inputs
   rotated through enough sets to exceed twice the L2 cache, so it does not serve them; also
   replayed from a CUDA graph, without launch costs), with achieved GB/s and TFLOP/s against the
   device's measured copy bandwidth and bf16 matmul rate;
3. optionally runs the smoke and default suites on the GPU (``--suites``);
4. writes everything as JSONL records (``--out``; a directory that already holds a records.jsonl is
   refused, exit 2) that ``quantbench report`` renders, and prints a summary table last.

``--dry-run`` runs the same checks on the CPU under ``TRITON_INTERPRET=1`` at small shapes, without
timings; CI runs it so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...kernels.int8mm import int8_matmul_reference, quantize_per_token, quantize_weight_per_channel
from ...kernels.kvcache import decode_attention_ref, pack_codes
from ...kernels.ternary import pack_ternary
from ...methods.qlinear import IntQuantLinear
from ...methods.rtn import rtn_quantize_weight
from ..paths import SUITES_DIR
from ..run.records import environment, make_record, utc_now
from ..run.runner import run_suite
from ..run.suite import load_suite
from . import e2e

log = logging.getLogger(__name__)

FULL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K in, N out)
FULL_M = [1, 4, 16, 512, 2048]
DRY_SHAPES = [(128, 64), (200, 72)]  # K = 200: not a multiple of the K tiles (masks, a short group)
DRY_M = [1, 16, 33]  # decode (split-K) and mid-size tiles
SUITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@dataclass
class Case:
    """One kernel: ``prepare(M, K, N, dtype, device, seed)`` returns an object with ``.run()`` (the
    kernel), ``.reference()`` (torch reference, fp32/fp64), ``.out`` (the output tensor the kernel
    writes, poisoned before each run) and ``.bytes``/``.flops`` (minimum traffic and work)."""

    name: str
    prepare: Callable[..., Any]
    target: str  # the issue's speed target, for the summary
    shapes: Callable[[bool], list[tuple[int, int, int]]] | None = None  # (M, K, N) list; None: the GEMM grid
    tol: float = 2e-2


@dataclass
class Result:
    case: str
    M: int
    K: int
    N: int
    rel_err: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    ms: float | None = None
    ms_fp16: float | None = None
    ms_graph: float | None = None  # per call, replayed from a CUDA graph: GPU time without launch overhead
    ms_fp16_graph: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.ms_fp16 / self.ms if self.ms and self.ms_fp16 else None

    @property
    def graph_speedup(self) -> float | None:
        return self.ms_fp16_graph / self.ms_graph if self.ms_graph and self.ms_fp16_graph else None


class _Inst:
    """A prepared kernel call: ``run`` writes ``out``; ``reference`` recomputes it in fp32 torch."""

    def __init__(
        self,
        run: Callable[[], Any],
        reference: Callable[[], Any],
        out: Any,
        nbytes: float,
        flops: float,
        run_fp16: Callable[[], Any] | None = None,
    ) -> None:
        self._run, self.reference, self.out, self.bytes, self.flops = run, reference, out, nbytes, flops
        if run_fp16 is not None:
            self.run_fp16 = run_fp16

    def run(self) -> None:
        """Run the kernel into freshly poisoned memory, then copy its result into ``out``."""
        import torch

        poison = torch.full_like(self.out, float("nan"))  # the allocator hands this block to the kernel's output
        del poison
        self.out.copy_(self._run())

    def run_kernel(self) -> Any:
        return self._run()


def _gen(seed: int, device: str) -> Any:
    import torch

    return torch.Generator(device=device).manual_seed(seed)


_WEIGHTS: dict[tuple[Any, ...], Any] = {}


def _weights(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """Weights depend on (kernel, K, N, seed, ...) but not on M: built once per shape and reused by
    every M (the CPU-side quantization dominated the run time).  Only the current shape is kept."""
    for k in [k for k in _WEIGHTS if k[:3] != key[:3]]:
        del _WEIGHTS[k]
    if key not in _WEIGHTS:
        _WEIGHTS[key] = build()
    return _WEIGHTS[key]


def _activations(M: int, K: int, seed: int, device: str, dtype: Any) -> Any:
    import torch

    return torch.randn(M, K, generator=_gen(seed * 1_000_003 + M, "cpu")).to(device, dtype)


def _w4a16(M: int, K: int, N: int, dtype: Any, device: str, seed: int, act_order: bool = True) -> _Inst:
    import torch

    from ...kernels.triton_w4a16 import w_int_matmul  # deferred: triton is optional

    def build() -> Any:
        g = _gen(seed, "cpu")
        w = torch.randn(N, K, generator=g)
        codes, scales, zeros = rtn_quantize_weight(w, 4, 128, False)
        g_idx = torch.arange(K) // 128  # sorted groups: the common checkpoint layout
        if act_order:  # GPTQ desc_act: the groups in a permuted column order
            g_idx = g_idx[torch.randperm(K, generator=g)]
        layer = IntQuantLinear.from_codes(codes, scales, zeros, 4, 128, g_idx=g_idx).to(device)
        w_ref = layer.dequantized_weight().to(device)
        return layer, w_ref, w_ref.to(dtype)

    layer, w_ref, w16 = _weights(("w4a16", K, N, act_order, seed, device, dtype), build)
    x = _activations(M, K, seed, device, dtype)
    out = torch.empty(M, N, device=device, dtype=dtype)
    return _Inst(
        lambda: w_int_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4),
        lambda: x.double() @ w_ref.double().t(),
        out,
        nbytes=K * N / 2 + 2 * (M * K + M * N) + (K // 128) * N * 2.5,
        flops=2 * M * K * N,
        run_fp16=lambda: x @ w16.t(),
    )


def _w4a16_sorted(M: int, K: int, N: int, dtype: Any, device: str, seed: int) -> _Inst:
    return _w4a16(M, K, N, dtype, device, seed, act_order=False)


def _int8(M: int, K: int, N: int, dtype: Any, device: str, seed: int) -> _Inst:
    import torch

    from ...kernels.triton_int8 import int8_matmul_triton  # deferred: triton is optional

    def build() -> Any:
        w = torch.randn(N, K, generator=_gen(seed, "cpu"))
        wq, ws = quantize_weight_per_channel(w)
        return wq.to(device), ws.to(device), w.to(device, dtype)

    wq, ws, w16 = _weights(("int8", K, N, seed, device, dtype), build)
    x = _activations(M, K, seed, "cpu", torch.float32)
    xq, xs = quantize_per_token(x)
    xq, xs, x16 = xq.to(device), xs.to(device), x.to(device, dtype)
    out = torch.empty(M, N, device=device, dtype=dtype)
    return _Inst(
        lambda: int8_matmul_triton(xq, xs, wq, ws, out_dtype=dtype),
        lambda: int8_matmul_reference(xq, xs, wq, ws),  # exact integer products in float64, on the device
        out,
        nbytes=M * K + K * N + 2 * M * N,
        flops=2 * M * K * N,
        run_fp16=lambda: x16 @ w16.t(),
    )


def _ternary(M: int, K: int, N: int, dtype: Any, device: str, seed: int) -> _Inst:
    import torch

    from ...kernels.triton_ternary import ternary_matmul  # deferred: triton is optional

    def build() -> Any:
        g = _gen(seed, "cpu")
        codes = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
        scale = torch.rand(1, generator=g) + 0.5
        w_ref = (codes.double() * scale.double()).to(device)
        return pack_ternary(codes, "2bit").to(device), scale.to(device), w_ref, w_ref.to(dtype)

    packed, scale_d, w_ref, w16 = _weights(("ternary", K, N, seed, device, dtype), build)
    x = _activations(M, K, seed, device, dtype)
    out = torch.empty(M, N, device=device, dtype=dtype)
    return _Inst(
        lambda: ternary_matmul(x, packed, scale_d, out_dtype=dtype),
        lambda: x.double() @ w_ref.t(),
        out,
        nbytes=K * N / 4 + 2 * (M * K + M * N),
        flops=2 * M * K * N,
        run_fp16=lambda: x @ w16.t(),
    )


def _kv_decode(M: int, K: int, N: int, dtype: Any, device: str, seed: int, prec: str | None = None,
               splits: int | None = None, block_t: int = 64) -> _Inst:
    """Decode attention: M = batch, K = context tokens T, N = query heads (8 KV heads, d_h 128)."""
    import torch

    from ...kernels.triton_kv_attention import decode_attention_triton  # deferred: triton is optional

    g = _gen(seed, device)  # generated where they are used: the 32k x batch-8 inputs took minutes on a CPU
    B, T, Hq, Hkv, D, bits, gs = M, K, N, max(1, N // 4), 128, 4, 32
    q = torch.randn(B, Hq, D, generator=g, device=device)
    kc, vc = (
        pack_codes(torch.randint(0, 16, (B, Hkv, T, D), generator=g, device=device, dtype=torch.uint8), bits)
        for _ in range(2)
    )
    ks, vs = (torch.rand(B, Hkv, T, D // gs, generator=g, device=device) * 0.1 + 0.01 for _ in range(2))
    kz, vz = (torch.randn(B, Hkv, T, D // gs, generator=g, device=device) * 0.1 for _ in range(2))
    dev = (kc, ks, kz, vc, vs, vz)
    qd = q
    out = torch.empty(B, Hq, D, device=device, dtype=torch.float32)
    kf = torch.randn(B, Hq, T, D, generator=g, device=device, dtype=dtype)
    vf = torch.randn(B, Hq, T, D, generator=g, device=device, dtype=dtype)
    q16 = q.to(dtype).unsqueeze(2)

    def fp16_attention() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q16, kf, vf)

    return _Inst(
        lambda: decode_attention_triton(qd, *dev, bits, block_t, splits, prec),
        lambda: decode_attention_ref(q, kc, ks, kz, vc, vs, vz, bits),
        out,
        nbytes=B * Hkv * T * (D * bits / 8 * 2 + 4 * 4 * D // gs),
        flops=4 * B * Hq * T * D,
        run_fp16=fp16_attention,
    )


def _kv_decode_tf32x3(M: int, K: int, N: int, dtype: Any, device: str, seed: int) -> _Inst:
    """As ``_kv_decode`` with fp32-accurate 3xTF32 dots instead of the default TF32: what accuracy costs."""
    return _kv_decode(M, K, N, dtype, device, seed, prec="tf32x3")


def _kv_split_cases() -> list[Case]:
    """The KV kernel at B = 1, T = 32k with more T splits (and shorter tiles) than the default ~4
    programs per SM: is the default split latency-bound?  (Dry run: T = 1000.)"""

    def make(splits: int, block_t: int) -> Callable[..., _Inst]:
        def prepare(M: int, K: int, N: int, dtype: Any, device: str, seed: int) -> _Inst:
            return _kv_decode(M, K, N, dtype, device, seed, splits=min(splits, max(1, K // block_t)),
                              block_t=block_t)  # fmt: skip

        return prepare

    return [Case(f"kv-int4-decode-attn-s{sp}-t{bt}", make(sp, bt), "split-size probe",
                 shapes=lambda dry: [(1, 1000, 8)] if dry else [(1, 32768, 32)], tol=1e-3)
            for sp, bt in ((128, 64), (256, 32))]  # fmt: skip


def _kv_shapes(dry: bool) -> list[tuple[int, int, int]]:
    return [(1, 1000, 8), (2, 128, 8)] if dry else [(1, 4096, 32), (1, 32768, 32), (8, 32768, 32)]


def _cases() -> list[Case]:
    """Every Triton kernel of the project, with its torch reference and the issue's speed target."""
    return [
        Case("w4a16-gptq", _w4a16, "M=1: >= 3x fp16 cuBLAS (graph); M=2048: >= 0.9x", tol=1e-2),
        Case("w4a16-gptq-sorted", _w4a16_sorted, "as w4a16-gptq (sorted g_idx, no act-order)", tol=1e-2),
        Case("w8a8-int8", _int8, "M>=512: >= 1.5x fp16", tol=1e-2),
        Case("ternary-2bit", _ternary, "M=1: >= 3x fp16 (graph); M=2048: >= 0.8x", tol=1e-2),
        # TF32 dots: 7e-4 relative error measured on an H200 (session 9); 3xTF32 below for comparison
        Case("kv-int4-decode-attn", _kv_decode, "32k context: >= 2.5x fp16 SDPA", shapes=_kv_shapes, tol=2e-3),
        Case("kv-int4-decode-attn-tf32x3", _kv_decode_tf32x3, "as above, fp32-accurate 3xTF32 dots",
             shapes=lambda dry: _kv_shapes(dry)[1:], tol=1e-3),
        *_kv_split_cases(),
    ]


def time_cuda(fn: Callable[[], Any], warmup: int = 10, repeats: int = 50) -> float:
    """Median milliseconds of ``fn`` with CUDA events, after warm-up."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_graph(fns: list[Callable[[], Any]], repeats: int = 20) -> float:
    """Median milliseconds per call of ``fns`` (run in turn) replayed from one CUDA graph.

    Eager timings of a small kernel include its Python launch cost (the GPU idles while the
    wrapper runs); the graph replay measures the GPU work alone, as a served model would see it."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, caches) outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    del graph
    return statistics.median(times)


def device_ceilings() -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    import torch

    n = 1 << 28  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), 3, 20)
    bw = 2 * src.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = time_cuda(lambda: a @ b, 3, 20)
    return {"copy_gbps": bw, "bf16_tflops": 2 * 8192**3 / ms_mm / 1e9}


def rotation_sets(nbytes: float) -> int:
    """Input sets to rotate through so that together they are twice the L2 cache (3 to 16): a 4-bit
    4096x4096 weight is 8 MB, and three of them would sit in a 50 MB L2 between calls."""
    import math

    import torch

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return int(min(16, max(3, math.ceil(2 * l2 / max(nbytes, 1.0)))))


def check_case(case: Case, M: int, K: int, N: int, device: str, dtype: Any, timing: bool, seed: int) -> Result:
    import torch

    res = Result(case.name, M, K, N)
    try:
        inst = case.prepare(M, K, N, dtype, device, seed)
        inst.out.fill_(float("nan"))
        inst.run()
        out = inst.out.double().cpu()
        ref = inst.reference().double().cpu()
        if torch.isnan(out).any():
            res.ok, res.note = False, "unwritten (NaN) output elements"
        else:
            res.rel_err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            res.max_err = float((out - ref).abs().max())
            res.ok = res.rel_err <= case.tol
        if timing and res.ok:
            n_sets = rotation_sets(inst.bytes)
            res.extra["input_sets"] = n_sets
            sets = [case.prepare(M, K, N, dtype, device, seed + 1 + i) for i in range(n_sets)]  # rotate inputs
            it = iter(range(1 << 30))
            res.ms = time_cuda(lambda: sets[next(it) % n_sets].run_kernel())
            if hasattr(inst, "run_fp16"):
                it2 = iter(range(1 << 30))
                res.ms_fp16 = time_cuda(lambda: sets[next(it2) % n_sets].run_fp16())
            res.gbps = inst.bytes / res.ms / 1e6
            res.tflops = inst.flops / res.ms / 1e9
            res.extra = dict(getattr(inst, "extra", {}) or {})
            try:
                res.ms_graph = time_graph([s.run_kernel for s in sets])
                if hasattr(inst, "run_fp16"):
                    res.ms_fp16_graph = time_graph([s.run_fp16 for s in sets])
                res.extra["graph_gbps"] = inst.bytes / res.ms_graph / 1e6
            except Exception as e:  # the eager timing stands
                res.extra["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    except Exception as e:  # a failing case is reported, the check goes on
        res.ok, res.note = False, f"{type(e).__name__}: {e}"[:200]
    return res


def run_checks(
    dry_run: bool,
    seed: int = 0,
    only: str | None = None,
    on_result: Callable[[Result, dict[str, float]], None] | None = None,
) -> tuple[list[Result], dict[str, float]]:
    """Every case at its shapes; ``on_result(result, ceilings)`` after each (to save it at once)."""
    import torch

    if dry_run:
        device, dtype, timing = "cpu", torch.float32, False
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check needs a CUDA GPU (use --dry-run on the CPU)")
        device, dtype, timing = "cuda", torch.float16, True
    ceilings = device_ceilings() if timing else {}
    results = []
    for case in _cases():
        if only and only not in case.name:
            continue
        grid = (
            case.shapes(dry_run)
            if case.shapes
            else [
                (m, k, n) for (k, n) in (DRY_SHAPES if dry_run else FULL_SHAPES) for m in (DRY_M if dry_run else FULL_M)
            ]
        )
        for M, K, N in grid:
            r = check_case(case, M, K, N, device, dtype, timing, seed)
            if timing and r.gbps and ceilings:
                r.extra["bw_frac"] = r.gbps / ceilings["copy_gbps"]
            results.append(r)
            log.info(
                "%s M=%d K=%d N=%d ok=%s rel=%.2e ms=%s graph ms=%s",
                r.case,
                M,
                K,
                N,
                r.ok,
                r.rel_err or -1,
                r.ms,
                r.ms_graph,
            )
            if on_result is not None:
                on_result(r, ceilings)
    return results, ceilings


def summary_table(results: list[Result], ceilings: dict[str, float], device_name: str) -> str:
    lines = [
        f"gpu-check on {device_name}"
        + (f" — copy {ceilings['copy_gbps']:.0f} GB/s, bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s" if ceilings else ""),
        "| kernel | M | K | N | ok | rel err | ms | fp16 ms | speedup | GB/s | %bw | TFLOP/s "
        "| graph ms | fp16 graph ms | graph speedup |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in results:
        lines.append(
            f"| {r.case} | {r.M} | {r.K} | {r.N} | {'yes' if r.ok else 'NO ' + r.note} | "
            f"{f(r.rel_err, '.1e')} | {f(r.ms, '.4f')} | {f(r.ms_fp16, '.4f')} | {f(r.speedup, '.2f')} | "
            f"{f(r.gbps, '.0f')} | {f(r.extra.get('bw_frac') and 100 * r.extra['bw_frac'], '.0f')} | "
            f"{f(r.tflops, '.1f')} | {f(r.ms_graph, '.4f')} | {f(r.ms_fp16_graph, '.4f')} | "
            f"{f(r.graph_speedup, '.2f')} |"
        )
    return "\n".join(lines)


def run_environment() -> dict[str, Any]:

    return {**environment(), "started": utc_now()}


def to_records(
    results: list[Result], ceilings: dict[str, float], device_name: str, env: dict[str, Any] | None = None
) -> list[dict[str, Any]]:

    env = env or run_environment()
    out = []
    for r in results:
        cell = f"{r.case}/M{r.M}-K{r.K}-N{r.N}"
        base: dict[str, Any] = dict(
            run_id=f"gpu-check-{env['started']}",
            suite="gpu-check",
            cell=cell,
            model={
                "name": "kernel",
                "source": None,
                "sha256": None,
                "params": None,
                "source_precision": None,
                "dtype": None,
            },
            method=r.case,
            method_config={"M": r.M, "K": r.K, "N": r.N},
            provenance=env,
        )
        proto = {"device": device_name, **ceilings, **r.extra}
        out.append(
            make_record(
                **base,
                metric="kernel_rel_error",
                value=r.rel_err,
                unit="rel",
                higher_is_better=False,
                protocol=proto,
                status="ok" if r.ok else "failed",
                error=r.note or None,
            )
        )
        if r.ms is not None:
            out.append(
                make_record(
                    **base,
                    metric="kernel_ms",
                    value=r.ms,
                    unit="ms",
                    higher_is_better=False,
                    protocol={
                        **proto,
                        "fp16_ms": r.ms_fp16,
                        "gbps": r.gbps,
                        "tflops": r.tflops,
                        "graph_ms": r.ms_graph,
                        "fp16_graph_ms": r.ms_fp16_graph,
                    },
                )
            )
    return out


def _model_arg(text: str) -> Any:
    """``--model``: a model string, or a flow mapping as a suite writes one (``{random: llama, hidden_size: 1024}``)."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {str(e).splitlines()[0]}") from None


def _cmd_e2e(args: argparse.Namespace) -> int:
    """``--e2e``: :func:`e2e.run_e2e` under ``--out``, its table printed; exit 0 only when it passes."""
    out = Path(args.out or f"results/runs/gpu-e2e-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if (out / "e2e.json").exists():
        print(f"gpu-check: {out / 'e2e.json'} already exists; give --out a new or empty directory", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    result = e2e.run_e2e(out, args.e2e_device, args.model, args.cells, args.limit)
    print(e2e.table(result, args.e2e_device))
    return 0 if result["ok"] else 1


def cmd_gpu_check(args: argparse.Namespace) -> int:
    if getattr(args, "e2e", False):  # a Namespace built without the e2e flags (tests, scripts) runs the checks
        return _cmd_e2e(args)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    import torch

    t0 = time.time()
    gpu = not args.dry_run and torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if gpu else "CPU (TRITON_INTERPRET=1, dry run)"
    save = None
    suites = args.suites.split(",") if args.suites and not args.dry_run else []
    bad = [n for n in suites if not SUITE_NAME.fullmatch(n)]
    if bad:  # a suite name becomes a directory under --out: plain names only
        print(f"gpu-check: invalid suite name {bad[0]!r} (letters, digits, '.', '_', '-' only)", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path, env = out / "records.jsonl", run_environment()
        try:
            path.open("x").close()  # never overwrite (nor follow a link to) an earlier run's records
        except FileExistsError:
            print(f"gpu-check: {path} already exists; give --out a new or empty directory", file=sys.stderr)
            return 2

        def save(r: Result, ceilings: dict[str, float]) -> None:  # after every case: a timeout keeps the rest
            with open(path, "a") as f:
                for rec in to_records([r], ceilings, device_name, env):
                    f.write(json.dumps(rec) + "\n")

    results, ceilings = run_checks(args.dry_run, args.seed, args.only, on_result=save)
    if suites:
        for name in suites:
            run_suite(load_suite(SUITES_DIR / f"{name}.yaml"), Path(args.out or "results/runs") / f"gpu-{name}")
    print(summary_table(results, ceilings, device_name))
    print(
        f"{sum(bool(r.ok) for r in results)} passed, {sum(not r.ok for r in results)} failed "
        f"in {time.time() - t0:.0f} s"
    )
    return 0 if results and all(r.ok for r in results) else 1


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="validate and time the Triton kernels (GPU; --dry-run on CPU)")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, small shapes, no timing")
    p.add_argument("--out", help="directory for records.jsonl (and suite runs); refused if it already holds "
                   "a records.jsonl")
    p.add_argument("--suites", help="comma-separated suites to run on the GPU afterwards, e.g. smoke,default")
    p.add_argument("--only", help="substring of the kernel names to check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--e2e", action="store_true", help="instead of the kernel checks: suites/gpu-smoke.yaml on "
                   "--e2e-device, then on the CPU, compared (fp/rtn perplexities to 1e-4, every cell ok)")
    p.add_argument("--e2e-device", default="cuda", help="device of the e2e run (default cuda; cpu: the CPU form)")
    p.add_argument("--model", action="append", type=_model_arg, help="with --e2e: replaces the suite's models "
                   "(repeatable): a model string or a flow mapping, e.g. '{random: llama, hidden_size: 1024}'")
    p.add_argument("--cells", help="with --e2e: comma-separated glob patterns of cell names")
    p.add_argument("--limit", type=int, help="with --e2e: cap on evaluation windows per cell")
    p.set_defaults(fn=cmd_gpu_check)


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m quantbench.harness.tools.gpu_check")
    add_command(_parser.add_subparsers())
    _args = _parser.parse_args(["gpu-check", *sys.argv[1:]])
    sys.exit(_args.fn(_args))
