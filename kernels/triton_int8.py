"""Triton W8A8 GEMM: int8 x int8 -> int32 accumulation, dequantization fused into the epilogue.

Each program computes a [BLOCK_M, BLOCK_N] tile of ``xq @ wq^T`` with ``tl.dot`` on int8 tiles
accumulating in int32 (exact, as the tensor cores' IMMA), then applies
``acc * x_scale[m] * w_scale[n] + bias[n]`` in fp32 and stores in the output dtype.  ``x_scale``
is per row (per-token dynamic scales; a static per-tensor scale is passed expanded or with
stride 0); ``wq`` is read as [N, K] through its strides (K-major B tiles, as the tensor cores
want them), so no transposed copy is made.

Decode (M <= 16) splits K over a second grid axis: each program scales its exact int32 partial,
and the fp32 partials are summed by the shared ``triton_tuning.splitk_epilogue`` / ``run_splitk``
(a 4096-wide layer has only 32-64 column tiles; the split gives ~4 programs per SM to stream the
int8 weights).  Larger M uses big autotuned tiles (128x128x128 and up) for the int8 tensor cores,
whose peak is twice bf16's.

On CPU it runs only under ``TRITON_INTERPRET=1`` (set before importing triton), with one fixed
small config (split-K on at decode, so the split-K paths are tested).  The int8 dot is exact there
too; the epilogue is fp32 either way.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .triton_tuning import autotune, cfg, grouped_tile, interpreted, launch_tuned, m_bucket, run_splitk, splitk_epilogue


@triton.jit
def _int8_matmul_kernel(
    a_ptr,
    b_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    c_ptr,
    wk_ptr,  # REDUCE == 2: fp32 split-K workspace [M, N] and tile counters, zero between launches
    cnt_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_xs,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    REDUCE: tl.constexpr,  # split-K partials: 1 atomics into the zeroed fp32 output, 2 one-launch reduction
):
    # grouped program order: GROUP_M row tiles reuse the same weight column tiles from L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_am = offs_m % M  # wrapped: the loads need no M/N masks (the store is masked)
    offs_bn = offs_n % N

    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * k_tiles * BLOCK_K
    k_hi = min(k_lo + k_tiles * BLOCK_K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=k_mask[None, :], other=0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn, mask=k_mask[:, None], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    # fused dequant epilogue: row scale x column scale (+ bias), in fp32
    xs = tl.load(xs_ptr + offs_am * stride_xs).to(tl.float32)
    ws = tl.load(ws_ptr + offs_bn).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    splitk_epilogue(y, bias_ptr, c_ptr, wk_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                    HAS_BIAS, SPLIT_K, REDUCE)  # fmt: skip


_DECODE_CONFIGS = [
    cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
    cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=8, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, SPLIT_K=4, GROUP_M=8),
    cfg(8, 3, BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
]
_LARGE_CONFIGS = [
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=256, SPLIT_K=1, GROUP_M=8),
    # deeper pipelines for the large tiles (192 KiB of shared memory at 4 stages on sm_90)
    cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
]
_INTERP_DECODE = cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)
_INTERP_LARGE = cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=8)
_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "REDUCE"]
_decode_tuned = autotune(_DECODE_CONFIGS, _KEY, reset_to_zero=["c_ptr"])(_int8_matmul_kernel)
_large_tuned = autotune(_LARGE_CONFIGS, _KEY)(_int8_matmul_kernel)


def int8_matmul_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias``: xq [M, K] int8, wq [N, K] int8.

    ``block_m/n/k`` pin the tile (no autotuning; BLOCK_K >= 32 for the int8 dot).  Under ``torch.compile``
    the call is one opaque custom op (the autotuner and the split-K bookkeeping do not trace)."""
    if torch.compiler.is_compiling() and block_m is None and block_n is None and block_k is None:
        return _int8_matmul_op(xq, x_scale, wq, w_scale, bias, out_dtype)
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"int8 operands expected, got {xq.dtype} and {wq.dtype}")
    M, K = xq.shape
    N = wq.shape[0]
    if wq.shape[1] != K or w_scale.shape != (N,):
        raise ValueError(f"wq {tuple(wq.shape)} / w_scale {tuple(w_scale.shape)} do not match xq [{M}, {K}]")
    x_scale = x_scale.reshape(-1)
    if x_scale.numel() == 1:
        stride_xs = 0
    elif x_scale.numel() == M:
        stride_xs = x_scale.stride(0)
    else:
        raise ValueError(f"x_scale has {x_scale.numel()} entries; expected 1 or M={M}")
    if M == 0:
        return torch.zeros(0, N, dtype=out_dtype, device=xq.device)
    decode = M <= 16
    pinned = block_m is not None or block_n is not None or block_k is not None
    flags = dict(HAS_BIAS=bias is not None)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    def launch(out: torch.Tensor, wk: torch.Tensor, cnt: torch.Tensor, reduce: int, same: bool = False) -> None:
        args = (
            xq,
            wq,
            x_scale,
            w_scale,
            bias if bias is not None else w_scale,
            out,
            wk,
            cnt,
            M,
            N,
            K,
            m_bucket(M),
            xq.stride(0),
            xq.stride(1),
            wq.stride(0),
            wq.stride(1),
            stride_xs,
            out.stride(0),
            out.stride(1),
        )
        if pinned or interpreted():
            c = _INTERP_DECODE if decode else _INTERP_LARGE
            meta = dict(c.kwargs)
            if pinned:
                meta.update(BLOCK_M=max(16, block_m or 16), BLOCK_N=block_n or 64, BLOCK_K=max(32, block_k or 64))
            _int8_matmul_kernel[grid(meta)](
                *args, **flags, REDUCE=reduce, **meta, num_warps=c.num_warps, num_stages=c.num_stages
            )
            return
        launch_tuned(_decode_tuned if decode else _large_tuned, grid, same, out, reduce, *args, **flags)

    if decode:  # split-K
        return run_splitk("int8", launch, M, N, out_dtype, xq.device)
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    launch(out, out, out, 0)
    return out


@torch.library.custom_op("quantbench::int8_matmul", mutates_args=())
def _int8_matmul_op(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return int8_matmul_triton(xq, x_scale, wq, w_scale, bias, out_dtype)


@_int8_matmul_op.register_fake
def _int8_matmul_fake(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=out_dtype)
