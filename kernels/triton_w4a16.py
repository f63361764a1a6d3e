"""Triton W4A16 GEMM over the GPTQ checkpoint layout, dequantization fused into the matmul.

Reads the buffers of :class:`~quantbench.methods.qlinear.IntQuantLinear` as they are:
``qweight`` int32 [K * bits / 32, N] (codes packed along K, LSB first), ``qzeros`` int32
[n_groups, N * bits / 32] (integer zero points, packed along N, stored as used: ``w = s * (q - z)``),
``scales`` fp16 [n_groups, N] and ``g_idx`` int32 [K] (the group of each input column, so act-order
checkpoints need no reordering).  Each program computes a [BLOCK_M, BLOCK_N] tile of ``x @ W^T``:
for every K tile it unpacks the codes, gathers each row's group scale and zero through ``g_idx``,
dequantizes in registers and feeds ``tl.dot`` with fp32 accumulation.  2, 4 and 8 bits (``BITS``
divides 32) share the kernel; W4A16 (fp16/bf16 activations, 4-bit weights) is the main case.

On CPU it runs only under ``TRITON_INTERPRET=1`` (set before importing triton), where bf16 math is
wrong: there the tiles are cast to fp32 after loading and the dot runs in IEEE fp32.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from quantbench.methods.qlinear import IntQuantLinear


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _w_int_matmul_kernel(
    a_ptr,
    qw_ptr,
    s_ptr,
    qz_ptr,
    g_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_cm,
    stride_cn,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS  # codes per int32 word
    MASK: tl.constexpr = (1 << BITS) - 1
    # grouped program order: GROUP_M row tiles share the same weight column tiles in L2
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
    # zero-point word and bit offset of each output column (the same for every group)
    z_word = offs_n // PER
    z_shift = (offs_n % PER) * BITS

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        kn_mask = k_mask[:, None] & n_mask[None, :]
        qw = tl.load(qw_ptr + (offs_k[:, None] // PER) * stride_qk + offs_n[None, :] * stride_qn, mask=kn_mask, other=0)
        q = (qw >> ((offs_k[:, None] % PER) * BITS)) & MASK
        g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=kn_mask, other=0.0)
        qz = tl.load(qz_ptr + g[:, None] * stride_zg + z_word[None, :] * stride_zn, mask=kn_mask, other=0)
        z = (qz >> z_shift[None, :]) & MASK
        w = (q - z).to(tl.float32) * s.to(tl.float32)  # [BLOCK_K, BLOCK_N]
        if F32_DOT:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def w_int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int = 4,
    bias: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """``x [M, K] @ W^T`` with ``W`` [N, K] given in the GPTQ layout; output [M, N] in ``x.dtype``."""
    if 32 % bits:
        raise ValueError(f"the Triton kernel handles 2, 4 and 8 bits, not {bits}")
    M, K = x.shape
    N = scales.shape[1]
    if qweight.shape != (K * bits // 32, N) or g_idx.shape != (K,):
        raise ValueError(f"qweight {tuple(qweight.shape)} / g_idx {tuple(g_idx.shape)} do not match x [{M}, {K}]")
    if block_m is None:
        block_m = 16 if M <= 16 else 64
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _w_int_matmul_kernel[grid](
        x,
        qweight,
        scales,
        qzeros,
        g_idx,
        bias if bias is not None else scales,
        out,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        qzeros.stride(0),
        qzeros.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        HAS_BIAS=bias is not None,
        F32_DOT=interpreted() or x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
    )
    return out


def triton_int_linear(x: torch.Tensor, layer: IntQuantLinear) -> torch.Tensor:
    """Forward of an :class:`IntQuantLinear` through the Triton kernel (any leading dims)."""
    shape = x.shape
    y = w_int_matmul(
        x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bits, layer.bias
    )
    return y.reshape(*shape[:-1], layer.out_features)
