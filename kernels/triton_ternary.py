"""Triton ternary GEMM: unpacks 2-bit codes (4 per byte, ``kernels/ternary.py`` layout) inside the kernel.

``y[m, n] = scale[n] * a_scale[m] * sum_k x[m, k] * c[n, k]`` with ``c = ((byte >> 2*(k % 4)) & 3) - 1``.
Activations are either int8 (the BitNet b1.58 path: ``tl.dot`` int8 x int8 -> int32, ``a_scale = 1 / Q_b``)
or floating point (fp16/bf16/fp32, fp32 accumulation, ``a_scale = 1``).  Scales are per tensor (broadcast)
or per output channel.  Tested on CPU under ``TRITON_INTERPRET=1`` against the torch reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantbench.kernels.ternary import act_quant_int8


@triton.jit
def _ternary_gemm_kernel(
    x_ptr, p_ptr, s_ptr, as_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pn, stride_pk, stride_ym, stride_yn,
    SCALE_PER_N: tl.constexpr, INT8_ACT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT8_ACT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & mk[None, :], other=0)
        # [BLOCK_K, BLOCK_N] tile of packed bytes (each byte read by 4 consecutive k)
        b = tl.load(p_ptr + offs_n[None, :] * stride_pn + (offs_k[:, None] // 4) * stride_pk,
                    mask=mk[:, None] & (offs_n[None, :] < N), other=85)  # 85 = 0b01010101: four zero codes
        code = ((b.to(tl.int32) >> ((offs_k[:, None] % 4) * 2)) & 3) - 1
        if INT8_ACT:
            acc += tl.dot(x.to(tl.int8), code.to(tl.int8), out_dtype=tl.int32)
        elif DOT_FP32:  # fp32 activations, or the interpreter (whose bf16 math is wrong): exact ieee fp32
            acc += tl.dot(x.to(tl.float32), code.to(tl.float32), input_precision="ieee")
        else:  # fp16/bf16 on a GPU: codes are exact in x's dtype, fp32 accumulation on tensor cores
            acc += tl.dot(x, code.to(x.dtype))
    if SCALE_PER_N:
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    else:
        s = tl.load(s_ptr + offs_n * 0)
    a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    y = acc.to(tl.float32) * s[None, :] * a_s[:, None]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def ternary_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, a_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, block_m: int = 16, block_n: int = 32, block_k: int = 64,
) -> torch.Tensor:
    """x [M, K] (int8 with ``a_scale`` [M], or float) @ unpack(packed [N, ceil(K/4)])^T * scale -> [M, N]."""
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("x must be [M, K] and packed a uint8 [N, ceil(K/4)] matrix")
    M, K = x.shape
    N = packed.shape[0]
    if packed.shape[1] != -(-K // 4):
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; K={K} needs {-(-K // 4)}")
    int8 = x.dtype == torch.int8
    if int8 and a_scale is None:
        raise ValueError("int8 activations need a_scale (1 / Q_b per row)")
    a_s = (a_scale if a_scale is not None else torch.ones(M, device=x.device)).float().reshape(M).contiguous()
    s = scale.float().reshape(-1).contiguous()
    if s.numel() not in (1, N):
        raise ValueError(f"scale must have 1 or N={N} elements, got {s.numel()}")
    y = torch.empty(M, N, device=x.device, dtype=out_dtype or (torch.float32 if int8 else x.dtype))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _ternary_gemm_kernel[grid](
        x, packed, s, a_s, y, M, N, K,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), y.stride(0), y.stride(1),
        SCALE_PER_N=s.numel() == N and N > 1, INT8_ACT=int8,
        DOT_FP32=x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


def triton_ternary_linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """Forward of a 2-bit :class:`~quantbench.methods.bitnet.TernaryLinear` (tensor/channel scales) in Triton."""
    if layer.fmt != "2bit" or layer.granularity == "group":
        raise ValueError("the Triton ternary kernel takes 2-bit codes with per-tensor or per-channel scales")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if layer.act_bits == 8:
        xq, qb = act_quant_int8(x2)
        y = ternary_matmul(xq, layer.qweight, layer.scale, (1.0 / qb).reshape(-1), out_dtype=torch.float32)
    else:
        y = ternary_matmul(x2, layer.qweight, layer.scale, out_dtype=torch.float32)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)
