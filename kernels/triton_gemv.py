"""Triton GEMV (one activation row, M = 1) over packed integer weights: GPTQ-layout 2/4/8-bit and 2-bit ternary.

Decode at batch 1 is a matrix-vector product: every weight is used once, so the kernel is as fast as it
streams the packed bytes, and on Hopper the 4-bit and 2-bit unpack, not the memory, was the limit of the
``tl.dot`` kernels (H200, ``docs/gpu.md`` run 3: W4A16 read its 4-bit weight at 0.8 TB/s and the ternary
kernel its 2-bit weight at 0.23 TB/s, where the int8 kernel of the same shape streamed 2.4 TB/s).  This
kernel does no ``tl.dot`` and no layout conversion: each program holds a [BLOCK_W, BLOCK_N] tile of packed
int32 words as loaded and accumulates ``x[k] * (q[k, n] - z[n])`` into a tile of fp32 partial sums, reduced
across K once at the end.

The unpack costs three instructions per weight with the float "magic number" trick: for the field of
BITS bits at bit offset ``sh`` (< 16) of a word, ``(word & (MASK << sh)) | 0x4B000000`` read as fp32 is
exactly ``2^23 + q * 2^sh`` (the field lands in the mantissa of 2^23), so one fp32 subtraction of
``2^23 + z * 2^sh`` gives ``(q - z) * 2^sh`` exactly, and the activation is pre-scaled by ``2^-sh`` (exact)
before the multiply-add: no shift per field, no integer-to-float conversion (a quarter-rate instruction
on Hopper).  The upper 16 bits of a word are shifted down once per word.  Group scales are applied once
per K tile (a tile lies inside one group), per-tensor or per-channel scales once at the end.

K is split over a second grid axis (``SPLIT_K``), the partials summed by the shared
``triton_tuning.splitk_epilogue`` / ``run_splitk``.  Weights may be stored either way round: the GPTQ
layout packs along K in rows of N-contiguous words (``qweight`` [K / PER, N]), the ternary layout packs
along K inside each row (uint8 [N, K / 4], read as int32 [N, K / 16]); the strides say which, and the
load is coalesced along whichever is contiguous.  Under ``TRITON_INTERPRET=1`` the same kernel runs
(one fixed config, both unpack variants tested against the torch reference).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .triton_tuning import autotune, cfg, interpreted, launch_tuned, run_splitk, splitk_epilogue

__all__ = ["gemv_gptq", "gemv_ternary", "fit_words", "GEMV_MAX_M"]

GEMV_MAX_M = 1  # rows handled by the GEMV (M = 1: decode at batch 1); larger M takes the tl.dot kernels
MAGIC_UNPACK = True  # fp32 magic-number unpack (False: shift, mask and convert each field; kept for tests)
ONE_GROUP = 1 << 30


@triton.jit
def _packed_gemv_kernel(
    x_ptr,
    perm_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    N,
    K,
    stride_xk,
    stride_wk,  # between packed words along K
    stride_wn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    BITS: tl.constexpr,
    GS: tl.constexpr,  # rows per scale/zero group (ONE_GROUP: a single group); BLOCK_W * PER divides it
    ZERO_C: tl.constexpr,  # >= 0: every zero point is this constant (ternary: 1); -1: packed zeros [g, N / PER]
    SCALE_MODE: tl.constexpr,  # 0: scales [g, N] per group; 1: one scale; 2: one per output channel
    A_PERM: tl.constexpr,  # weight row k multiplies activation column perm[k] (GPTQ act-order, repacked)
    HAS_BIAS: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # packed words per K tile (BLOCK_W * PER weights)
    SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr,  # load tile i + 1 while unpacking tile i (the loads are not pipelined otherwise)
    REDUCE: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2  # fields in each 16-bit half of a word
    FMASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_bn = offs_n % N  # wrapped: loads need no N mask (the store is masked)
    n_words = tl.cdiv(K, PER)
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * k_tiles * BLOCK_K
    k_hi = min(k_lo + k_tiles * BLOCK_K, K)
    if ZERO_C < 0:
        z_word = offs_bn // PER
        z_shift = (offs_bn % PER) * BITS
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    if PREFETCH:  # the first tile's words; each iteration then loads the next tile's before unpacking its own
        offs_w0 = k_lo // PER + tl.arange(0, BLOCK_W)
        qw_next = tl.load(w_ptr + offs_w0[:, None] * stride_wk + offs_bn[None, :] * stride_wn,
                          mask=(offs_w0 * PER < k_hi)[:, None], other=0)  # fmt: skip
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_w = k0 // PER + tl.arange(0, BLOCK_W)
        if PREFETCH:  # register double buffering: the next tile's loads are in flight during this unpack
            qw = qw_next
            nxt = offs_w + BLOCK_W
            qw_next = tl.load(w_ptr + nxt[:, None] * stride_wk + offs_bn[None, :] * stride_wn,
                              mask=(nxt * PER < k_hi)[:, None], other=0)  # fmt: skip
        else:
            qw = tl.load(
                w_ptr + offs_w[:, None] * stride_wk + offs_bn[None, :] * stride_wn,
                mask=(offs_w < n_words)[:, None],
                other=0,
            )
        grp = k0 // GS
        if ZERO_C < 0:
            z = ((tl.load(z_ptr + grp * stride_zg + z_word * stride_zn) >> z_shift) & FMASK).to(tl.float32)
        else:
            z = tl.zeros((BLOCK_N,), dtype=tl.float32) + ZERO_C
        qh = qw >> 16  # the upper half's fields, brought below bit 16 once per word
        t = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(PER):
            offs_k = offs_w * PER + i
            if A_PERM:
                ka = tl.load(perm_ptr + offs_k, mask=offs_k < K, other=0)
            else:
                ka = offs_k
            xv = tl.load(x_ptr + ka * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            sh = (i % HALF) * BITS  # the field's offset in its half
            src = qw if i < HALF else qh
            if MAGIC:  # 2^23 + q * 2^sh, exactly, then (q - z) * 2^sh, exactly
                v = ((src & (FMASK << sh)) | 0x4B000000).to(tl.float32, bitcast=True)
                wv = v - (8388608.0 + z * (1 << sh))[None, :]
                t += (xv * (1.0 / (1 << sh)))[:, None] * wv
            else:
                wv = ((src >> sh) & FMASK).to(tl.float32) - z[None, :]
                t += xv[:, None] * wv
        if SCALE_MODE == 0:
            s = tl.load(s_ptr + grp * stride_sg + offs_bn * stride_sn).to(tl.float32)
            acc += t * s[None, :]
        else:
            acc += t
    y = tl.sum(acc, axis=0)
    if SCALE_MODE == 1:
        y = y * tl.load(s_ptr).to(tl.float32)
    elif SCALE_MODE == 2:
        y = y * tl.load(s_ptr + offs_bn * stride_sn).to(tl.float32)
    offs_m = tl.arange(0, 1)
    splitk_epilogue(y[None, :], bias_ptr, c_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, 1, N, 0, 1,
                    HAS_BIAS, SPLIT_K, REDUCE)  # fmt: skip


def fit_words(words: int, per: int, gs: int) -> int:
    """``words`` halved until a tile of ``words * per`` rows lies inside one group of ``gs`` rows (0: no groups)."""
    while gs and gs % (words * per) and words > 1:
        words //= 2
    return words


def _prune(configs: list[triton.Config], named_args: Any = None, **kwargs: Any) -> list[triton.Config]:
    """A K tile must lie inside one group (halve BLOCK_W until BLOCK_W * PER divides GS); no split may be
    empty (SPLIT_K at most the number of K tiles)."""
    gs, per = kwargs.get("GS", ONE_GROUP), 32 // kwargs.get("BITS", 4)
    k = (named_args or {}).get("K", kwargs.get("K"))
    out: dict[tuple, triton.Config] = {}
    for c in configs:
        meta = dict(c.kwargs)
        meta["BLOCK_W"] = fit_words(meta["BLOCK_W"], per, gs)
        if k is not None:
            meta["SPLIT_K"] = max(1, min(meta["SPLIT_K"], -(-k // (meta["BLOCK_W"] * per))))
        key = (tuple(sorted(meta.items())), c.num_warps, c.num_stages)
        out.setdefault(key, triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(out.values())


_CONFIGS = [
    cfg(w, st, BLOCK_N=bn, BLOCK_W=bw, SPLIT_K=sk, PREFETCH=pf)
    for pf in (0, 1)
    for (w, st, bn, bw, sk) in ((4, 3, 128, 16, 8), (4, 3, 128, 16, 16), (4, 3, 64, 16, 16), (8, 3, 256, 16, 8),
                                (4, 3, 128, 8, 16), (4, 2, 128, 32, 8))
]
_INTERP = cfg(4, 1, BLOCK_N=32, BLOCK_W=4, SPLIT_K=2, PREFETCH=1)
_KEY = ["N", "K", "BITS", "GS", "ZERO_C", "SCALE_MODE", "A_PERM", "REDUCE", "MAGIC"]
_tuned = autotune(_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["c_ptr"])(
    _packed_gemv_kernel
)


def _gemv(
    family: str,
    x: torch.Tensor,
    w: torch.Tensor,
    stride_wk: int,
    stride_wn: int,
    N: int,
    K: int,
    bits: int,
    scales: torch.Tensor,
    stride_s: tuple[int, int],
    zeros: torch.Tensor | None,
    zero_c: int,
    gs: int,
    scale_mode: int,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x.shape[0] != 1:
        raise ValueError(f"the GEMV takes one activation row, got {x.shape[0]}")
    flags = dict(BITS=bits, GS=gs, ZERO_C=zero_c, SCALE_MODE=scale_mode, A_PERM=perm is not None,
                 HAS_BIAS=bias is not None, MAGIC=MAGIC_UNPACK)  # fmt: skip
    z = zeros if zeros is not None else scales

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    def launch(out: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, reduce: int, same: bool = False) -> None:
        args = (x, perm if perm is not None else x, w, scales, z, bias if bias is not None else scales, out, ws, cnt,
                N, K, x.stride(1), stride_wk, stride_wn, stride_s[0], stride_s[1],
                z.stride(0) if zeros is not None else 0, z.stride(1) if zeros is not None else 0)  # fmt: skip
        if interpreted():
            c = _prune([_INTERP], K=K, **flags)[0]
            _packed_gemv_kernel[grid(c.kwargs)](*args, **flags, REDUCE=reduce, **c.kwargs, num_warps=c.num_warps,
                                                num_stages=c.num_stages)  # fmt: skip
            return
        launch_tuned(_tuned, grid, same, out, reduce, *args, **flags)

    return run_splitk(family, launch, 1, N, out_dtype, x.device)


def gemv_gptq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bits: int,
    gs: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [1, K] @ W^T`` for a GPTQ-layout weight whose K rows are in sorted groups of ``gs`` rows
    (``ONE_GROUP``: one group): ``qweight`` int32 [K / PER, N], ``scales`` [g, N], ``qzeros`` int32
    [g, N / PER]; ``perm`` (act-order, repacked rows): weight row k multiplies ``x[:, perm[k]]``."""
    K, N = x.shape[1], scales.shape[1]
    return _gemv("gemv-gptq", x, qweight, qweight.stride(0), qweight.stride(1), N, K, bits, scales,
                 (scales.stride(0), scales.stride(1)), qzeros, -1, gs, 0, perm, bias, x.dtype)  # fmt: skip


def gemv_ternary(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x [1, K] @ unpack(packed [N, K / 4])^T * scale`` for 2-bit ternary codes (``kernels/ternary.py``
    layout: code + 1 in bits 2i of byte k // 4); ``scale`` one value or one per output channel.  Needs
    K % 16 == 0 and a 4-byte aligned ``packed`` (it is read as int32 words of 16 codes)."""
    K, N = x.shape[1], packed.shape[0]
    if K % 16 or packed.shape[1] != K // 4 or packed.stride(1) != 1 or packed.stride(0) % 4 or packed.data_ptr() % 4:
        raise ValueError("gemv_ternary needs K % 16 == 0 and a contiguous, 4-byte aligned [N, K / 4] uint8 packing")
    words = packed.view(torch.int32)  # [N, K / 16]: word w of row n holds codes k = 16w .. 16w + 15
    s = scale.float().reshape(-1)
    mode = 1 if s.numel() == 1 else 2
    return _gemv("gemv-ternary", x, words, words.stride(1), words.stride(0), N, K, 2, s, (0, 1), None, 1,
                 ONE_GROUP, mode, None, None, out_dtype or x.dtype)  # fmt: skip
