"""Triton W8A8 GEMM: int8 x int8 -> int32 accumulation, dequantization fused into the epilogue.

Each program computes a [BLOCK_M, BLOCK_N] tile of ``xq @ wq^T`` with ``tl.dot`` on int8 tiles
accumulating in int32 (exact, as the tensor cores' IMMA), then applies
``acc * x_scale[m] * w_scale[n] + bias[n]`` in fp32 and stores in the output dtype.  ``x_scale``
is per row (per-token dynamic scales; a static per-tensor scale is passed expanded or with
stride 0); ``wq`` is read as [N, K] through its strides, so no transposed copy is made.

On CPU it runs only under ``TRITON_INTERPRET=1`` (set before importing triton).  The int8 dot is
exact there too; the epilogue is fp32 either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_xs,
    stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M row tiles reuse the same weight column tiles from L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    # fused dequant epilogue: row scale x column scale (+ bias), in fp32
    xs = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             y.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_matmul_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """``y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias``: xq [M, K] int8, wq [N, K] int8."""
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
    if block_m is None:
        block_m = 16 if M <= 16 else 64
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _int8_matmul_kernel[grid](
        xq, wq, x_scale, w_scale, bias if bias is not None else w_scale, out,
        M, N, K,
        xq.stride(0), xq.stride(1),
        wq.stride(0), wq.stride(1),
        stride_xs,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
    )
    return out
