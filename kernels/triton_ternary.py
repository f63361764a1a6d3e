"""Triton ternary GEMM: unpacks 2-bit codes (4 per byte, ``kernels/ternary.py`` layout) inside the kernel.

``y[m, n] = scale[n] * a_scale[m] * sum_k x[m, k] * c[n, k]`` with ``c = ((byte >> 2*(k % 4)) & 3) - 1``.
Activations are either int8 (the BitNet b1.58 path: ``tl.dot`` int8 x int8 -> int32, ``a_scale = 1 / Q_b``)
or floating point (fp16/bf16/fp32, fp32 accumulation, ``a_scale = 1``).  Scales are per tensor (broadcast)
or per output channel.  Tested on CPU under ``TRITON_INTERPRET=1`` against the torch reference
(one fixed small config there; on a GPU the tiles are autotuned per (M bucket, N, K)).

Decode (M <= 16) splits K over a second grid axis and sums the scaled fp32 partials (the shared
``triton_tuning.splitk_epilogue`` / ``run_splitk``): the 2-bit weights are 1/8 of fp16's bytes,
and only with ~4 programs per SM are enough of them in flight to stream at memory speed.  Larger
M uses 128x128-class tiles so each unpacked weight tile feeds a large MMA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from .ternary import act_quant_int8
from .triton_gemv import GEMV_MAX_M, gemv_ternary
from .triton_tuning import autotune, cfg, grouped_tile, interpreted, launch_tuned, m_bucket, run_splitk, splitk_epilogue

if TYPE_CHECKING:
    from .ternary import TernaryPackedWeight


@triton.jit
def _ternary_gemm_kernel(
    x_ptr,
    p_ptr,
    s_ptr,
    as_ptr,
    y_ptr,
    ws_ptr,  # REDUCE == 2: fp32 split-K workspace [M, N] and tile counters, zero between launches
    cnt_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_pn,
    stride_pk,
    stride_ym,
    stride_yn,
    SCALE_PER_N: tl.constexpr,
    HAS_A_SCALE: tl.constexpr,
    INT8_ACT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    REDUCE: tl.constexpr,  # split-K partials: 1 atomics into the zeroed fp32 output, 2 one-launch reduction
):
    # grouped program order: GROUP_M row tiles reuse the same packed weight tiles from L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = offs_m % M  # wrapped: the loads need no M/N masks (the store is masked)
    offs_pn = offs_n % N
    if INT8_ACT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    shifts = tl.arange(0, 4) * 2
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * k_tiles * BLOCK_K
    k_hi = min(k_lo + k_tiles * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        x = tl.load(x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mk[None, :], other=0)
        # [BLOCK_K / 4, BLOCK_N] tile of packed bytes, each loaded once and unpacked in registers
        offs_b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        b = tl.load(
            p_ptr + offs_pn[None, :] * stride_pn + offs_b[:, None] * stride_pk,
            mask=(offs_b < tl.cdiv(K, 4))[:, None],
            other=85,  # 85 = 0b01010101: four zero codes
        )
        code = tl.reshape((b.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & 3, (BLOCK_K, BLOCK_N)) - 1
        if INT8_ACT:
            acc += tl.dot(x.to(tl.int8), code.to(tl.int8), out_dtype=tl.int32)
        elif DOT_FP32:  # fp32 activations, or the interpreter (whose bf16 math is wrong): exact ieee fp32
            acc += tl.dot(x.to(tl.float32), code.to(tl.float32), input_precision="ieee")
        else:  # fp16/bf16 on a GPU: codes are exact in x's dtype, fp32 accumulation on tensor cores
            acc += tl.dot(x, code.to(x.dtype))
    if SCALE_PER_N:
        s = tl.load(s_ptr + offs_pn)
    else:
        s = tl.load(s_ptr + offs_pn * 0)
    y = acc.to(tl.float32) * s[None, :]
    if HAS_A_SCALE:
        y = y * tl.load(as_ptr + offs_xm)[:, None]
    # no bias here (triton_ternary_linear adds it): s_ptr stands in for the unused bias pointer
    splitk_epilogue(y, s_ptr, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn,
                    False, SPLIT_K, REDUCE)  # fmt: skip


@triton.jit
def _ternary_dequant_kernel(p_ptr, s_ptr, w_ptr, N, K, stride_pn, stride_pk, SCALE_PER_N: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """W [N, K] (row-major, w_ptr's dtype) = (code - 1) * scale: each packed byte loaded once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_mask = offs_n < N
    b = tl.load(p_ptr + offs_n[:, None] * stride_pn + offs_b[None, :] * stride_pk,
                mask=n_mask[:, None] & (offs_b < tl.cdiv(K, 4))[None, :], other=85).to(tl.int32)  # fmt: skip
    if SCALE_PER_N:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        s = tl.load(s_ptr + offs_n * 0)
    shifts = tl.arange(0, 4) * 2
    code = tl.reshape((b[:, :, None] >> shifts[None, None, :]) & 3, (BLOCK_N, BLOCK_B * 4))
    w = (code - 1).to(tl.float32) * s[:, None]
    offs_k = tl.program_id(1) * BLOCK_B * 4 + tl.arange(0, BLOCK_B * 4)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])  # fmt: skip


def dequantize_ternary(packed: torch.Tensor, scale: torch.Tensor, K: int, dtype: Any) -> torch.Tensor:
    """W [N, K] in ``dtype``, ``(code - 1) * scale`` (one scale, or one per row), from 2-bit codes."""
    N = packed.shape[0]
    s = scale.float().reshape(-1).contiguous()
    w = torch.empty(N, K, dtype=dtype, device=packed.device)
    bn, bb = (32, 64) if not interpreted() else (16, 8)
    _ternary_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(triton.cdiv(K, 4), bb))](
        packed, s, w, N, K, packed.stride(0), packed.stride(1), SCALE_PER_N=s.numel() == N and N > 1,
        BLOCK_N=bn, BLOCK_B=bb, num_warps=4)  # fmt: skip
    return w


DEQUANT_MIN_M = 512  # fp activations, from this many rows on: dequantize once + cuBLAS (as W4A16)
_DECODE_CONFIGS = [
    cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
    cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=16, GROUP_M=8),
    cfg(8, 3, BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, SPLIT_K=4, GROUP_M=8),
]
_LARGE_CONFIGS = [
    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
]
_INTERP_DECODE = cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)
_INTERP_LARGE = cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=8)
_KEY = ["M_BUCKET", "N", "K", "INT8_ACT", "REDUCE"]
_decode_tuned = autotune(_DECODE_CONFIGS, _KEY, reset_to_zero=["y_ptr"])(_ternary_gemm_kernel)
_large_tuned = autotune(_LARGE_CONFIGS, _KEY)(_ternary_gemm_kernel)


def ternary_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """x [M, K] (int8 with ``a_scale`` [M], or float) @ unpack(packed [N, ceil(K/4)])^T * scale -> [M, N].

    ``block_m/n/k`` pin the tile (no autotuning).  Under ``torch.compile`` the call is one opaque custom op
    (the autotuner and the split-K bookkeeping do not trace)."""
    if torch.compiler.is_compiling() and block_m is None and block_n is None and block_k is None:
        return _ternary_matmul_op(x, packed, scale, a_scale,
                                  out_dtype or (torch.float32 if x.dtype == torch.int8 else x.dtype))
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("x must be [M, K] and packed a uint8 [N, ceil(K/4)] matrix")
    M, K = x.shape
    N = packed.shape[0]
    if packed.shape[1] != -(-K // 4):
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; K={K} needs {-(-K // 4)}")
    int8 = x.dtype == torch.int8
    if int8 and a_scale is None:
        raise ValueError("int8 activations need a_scale (1 / Q_b per row)")
    a_s = a_scale.float().reshape(M).contiguous() if a_scale is not None else None
    s = scale.float().reshape(-1).contiguous()
    if s.numel() not in (1, N):
        raise ValueError(f"scale must have 1 or N={N} elements, got {s.numel()}")
    out_dtype = out_dtype or (torch.float32 if int8 else x.dtype)
    if M == 0:
        return torch.zeros(0, N, device=x.device, dtype=out_dtype)
    pinned = block_m is not None or block_n is not None or block_k is not None
    if not pinned and M <= GEMV_MAX_M and K % 16 == 0 and packed.is_contiguous() and packed.data_ptr() % 4 == 0:
        # batch-1 decode: the GEMV (int8 activations are exact in fp32; their row scale joins the weight scale)
        return gemv_ternary(x, packed, s * a_s if a_s is not None else s, out_dtype)
    if not pinned and not int8 and M >= DEQUANT_MIN_M:  # prefill: dequantize once (scale folded in) + cuBLAS
        return (x @ dequantize_ternary(packed, s, K, x.dtype).t()).to(out_dtype)
    decode = M <= 16
    flags = dict(
        SCALE_PER_N=s.numel() == N and N > 1,
        HAS_A_SCALE=a_s is not None,
        INT8_ACT=int8,
        DOT_FP32=x.dtype == torch.float32 or interpreted(),
    )

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    def launch(y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, reduce: int, same: bool = False) -> None:
        args = (x, packed, s, a_s if a_s is not None else s, y, ws, cnt, M, N, K, m_bucket(M),
                x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), y.stride(0), y.stride(1))  # fmt: skip
        if pinned or interpreted():
            c = _INTERP_DECODE if decode else _INTERP_LARGE
            meta = dict(c.kwargs)
            if pinned:
                meta.update(
                    BLOCK_M=max(16, block_m or 16), BLOCK_N=max(16, block_n or 32), BLOCK_K=max(32, block_k or 64)
                )
            _ternary_gemm_kernel[grid(meta)](
                *args, **flags, REDUCE=reduce, **meta, num_warps=c.num_warps, num_stages=c.num_stages
            )
            return
        launch_tuned(_decode_tuned if decode else _large_tuned, grid, same, y, reduce, *args, **flags)

    if decode:  # split-K
        return run_splitk("ternary", launch, M, N, out_dtype, x.device)
    y = torch.empty(M, N, device=x.device, dtype=out_dtype)
    launch(y, y, y, 0)
    return y


def triton_ternary_linear(x: torch.Tensor, layer: TernaryPackedWeight) -> torch.Tensor:
    """Forward of a 2-bit packed ternary weight (:class:`~quantbench.kernels.ternary.TernaryPackedWeight`, e.g. a
    ``TernaryLinear``; tensor or channel scales) in Triton."""
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


@torch.library.custom_op("quantbench::ternary_matmul", mutates_args=())
def _ternary_matmul_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, a_scale: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    return ternary_matmul(x, packed, scale, a_scale, out_dtype)


@_ternary_matmul_op.register_fake
def _ternary_matmul_fake(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, a_scale: torch.Tensor | None,
                         out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0], dtype=out_dtype)
