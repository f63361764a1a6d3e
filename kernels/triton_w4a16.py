"""Triton W4A16 GEMM over the GPTQ checkpoint layout, dequantization fused into the matmul.

Reads the buffers of a GPTQ-layout packed weight (:class:`~quantbench.kernels.intq.IntPackedWeight`) as they are:
``qweight`` int32 [K * bits / 32, N] (codes packed along K, LSB first), ``qzeros`` int32
[n_groups, N * bits / 32] (integer zero points, packed along N, stored as used: ``w = s * (q - z)``),
``scales`` fp16 [n_groups, N] and ``g_idx`` int32 [K] (the group of each input column).
2, 4 and 8 bits (``BITS`` divides 32) share the kernels; W4A16 (fp16/bf16 activations, 4-bit
weights) is the main case.

Three paths, chosen per call:

* **decode** (M <= 16): one [16, BLOCK_N] tile per program and **split-K** (grid axis 1): each
  program reduces a contiguous K range and its fp32 partial is summed with the other splits' by
  the shared ``triton_tuning.splitk_epilogue`` / ``run_splitk`` (in one launch, or with atomics
  into a zeroed fp32 buffer and one cast to the output dtype).  At M = 1 a 4096x4096 layer has
  only 32-64 column tiles; split-K gives the ~4 programs per SM that keep enough loads in flight
  to stream the 4-bit weights at memory speed.
* **mid** (16 < M < ``DEQUANT_MIN_M``): the same kernel, [BLOCK_M, BLOCK_N] tiles, no split.
* **prefill** (M >= ``DEQUANT_MIN_M``): a Triton kernel dequantizes W once into an fp16/bf16
  [K, N] buffer and cuBLAS does the GEMM (exllama's large-batch strategy: the dequantization is
  O(K*N), the GEMM O(M*K*N), and cuBLAS beats a fused Triton kernel at large M).

Scales and zeros: the layout of ``g_idx`` is analysed once per tensor (cached, one host sync):

* sorted groups (``g_idx[k] = k // gs``, the common checkpoint layout, or one group): each
  BLOCK_K tile lies inside one group (BLOCK_K divides gs), so the tile's scale and zero rows are
  two [BLOCK_N] vector loads per K step instead of a [BLOCK_K, BLOCK_N] gather;
* act-order (``g_idx`` a permutation of sorted groups, as GPTQ ``desc_act`` writes it): the
  weight is repacked once with its K rows sorted by group (cached beside the tensor), and the
  kernel reads the activations through the permutation (``x[:, perm]``, decode: in-kernel gather
  of the small activation tile; mid: one torch ``index_select``), so it runs the sorted path;
* anything else: the per-row gather of scales and zeros through ``g_idx`` (correct, slower).

On CPU it runs only under ``TRITON_INTERPRET=1`` (set before importing triton), where bf16 math is
wrong: there the tiles are cast to fp32 after loading and the dot runs in IEEE fp32; no autotuning
there (one fixed config per path).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from .intq import unpack_rows
from .triton_gemv import GEMV_MAX_M, ONE_GROUP, fit_words, gemv_gptq  # ONE_GROUP: GS of per-channel scales
from .triton_tuning import autotune, cfg, grouped_tile, interpreted, launch_tuned, m_bucket, run_splitk, splitk_epilogue

if TYPE_CHECKING:
    from .intq import IntPackedWeight

__all__ = ["DEQUANT_MIN_M", "interpreted", "triton_int_linear", "w_int_matmul", "dequantize_gptq"]

DEQUANT_MIN_M = 512  # from this many rows on: dequantize once + cuBLAS
COMPACT_UNPACK = True  # fused kernel: load packed words once and unpack in registers (sm_90: ~1/3 the smem)
REPACK_ACT_ORDER = True  # act-order: keep a group-sorted copy of the packed weight (+1x its 4-bit bytes)


@triton.jit
def _w_int_matmul_kernel(
    a_ptr,
    qw_ptr,
    s_ptr,
    qz_ptr,
    g_ptr,
    perm_ptr,
    bias_ptr,
    c_ptr,
    ws_ptr,  # REDUCE == 2: fp32 split-K workspace [M, N] and tile counters, zero between launches
    cnt_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
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
    GS: tl.constexpr,  # 0: gather scales/zeros through g_idx; else group of row k is k // GS
    A_PERM: tl.constexpr,  # read activation column perm[k] for weight row k
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    REDUCE: tl.constexpr,  # split-K partials: 1 atomics into c (zeroed fp32), 2 one-launch serial reduction
    COMPACT: tl.constexpr,  # packed-word tile + in-register unpack (False: per-row word loads)
):
    PER: tl.constexpr = 32 // BITS  # codes per int32 word
    MASK: tl.constexpr = (1 << BITS) - 1
    # grouped program order: GROUP_M row tiles share the same weight column tiles in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped row/column indices: loads need no M/N masks (the store is masked)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    # zero-point word and bit offset of each output column (the same for every group)
    z_word = offs_bn // PER
    z_shift = (offs_bn % PER) * BITS

    # this program's K range: a whole number of BLOCK_K tiles
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * k_tiles * BLOCK_K
    k_hi = min(k_lo + k_tiles * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if A_PERM:
            ka = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            ka = offs_k
        a = tl.load(a_ptr + offs_am[:, None] * stride_am + ka[None, :] * stride_ak, mask=k_mask[None, :], other=0.0)
        if COMPACT:  # load each packed word once ([BLOCK_K / PER, BLOCK_N]) and unpack in registers
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
            qw = tl.load(
                qw_ptr + offs_w[:, None] * stride_qk + offs_bn[None, :] * stride_qn,
                mask=(offs_w < tl.cdiv(K, PER))[:, None],
                other=0,
            )
            shifts = tl.arange(0, PER) * BITS
            q = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
        else:  # each word loaded by its PER rows (cache hits), shifted per row
            qw = tl.load(
                qw_ptr + (offs_k[:, None] // PER) * stride_qk + offs_bn[None, :] * stride_qn,
                mask=k_mask[:, None],
                other=0,
            )
            q = (qw >> ((offs_k[:, None] % PER) * BITS)) & MASK
        if GS > 0:  # the whole tile is in group k0 // GS: one scale row, one zero row
            grp = k0 // GS
            s = tl.load(s_ptr + grp * stride_sg + offs_bn * stride_sn)
            z = (tl.load(qz_ptr + grp * stride_zg + z_word * stride_zn) >> z_shift) & MASK
            w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
        else:
            g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_bn[None, :] * stride_sn)
            qz = tl.load(qz_ptr + g[:, None] * stride_zg + z_word[None, :] * stride_zn)
            w = (q - ((qz >> z_shift[None, :]) & MASK)).to(tl.float32) * s.to(tl.float32)
        if F32_DOT:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    splitk_epilogue(acc, bias_ptr, c_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                    HAS_BIAS, SPLIT_K, REDUCE)  # fmt: skip


@triton.jit
def _dequant_kernel(
    qw_ptr,
    s_ptr,
    qz_ptr,
    g_ptr,
    perm_ptr,
    w_ptr,
    N,
    K,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    BITS: tl.constexpr,
    GS: tl.constexpr,  # > 0: sorted groups of GS rows (BLOCK_W * PER divides GS); 0: gather through g_idx
    PERM: tl.constexpr,  # packed row k is written to output row perm[k] (act-order's group-sorted copy)
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """W [K, N] (row-major, w_ptr's dtype) = s[g(k), n] * (q[k, n] - z[g(k), n]).

    Each packed word is loaded once ([BLOCK_W, BLOCK_N] words) and its PER fields are written as PER
    row sets (rows k = PER * w + i, each store contiguous along N); with sorted groups the tile's scale
    and zero rows are loaded once."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    qw = tl.load(
        qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
        mask=(offs_w < tl.cdiv(K, PER))[:, None] & n_mask[None, :],
        other=0,
    )
    z_word = offs_n // PER
    z_shift = (offs_n % PER) * BITS
    if GS > 0:
        grp = (tl.program_id(0) * BLOCK_W * PER) // GS
        s = tl.load(s_ptr + grp * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        qz = tl.load(qz_ptr + grp * stride_zg + z_word * stride_zn, mask=n_mask, other=0)
        z = ((qz >> z_shift) & MASK).to(tl.float32)
    for i in tl.static_range(PER):
        offs_k = offs_w * PER + i
        k_mask = offs_k < K
        q = ((qw >> (i * BITS)) & MASK).to(tl.float32)
        if GS > 0:
            w = (q - z[None, :]) * s[None, :]
        else:
            mask = k_mask[:, None] & n_mask[None, :]
            g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            sg = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
            qzg = tl.load(qz_ptr + g[:, None] * stride_zg + z_word[None, :] * stride_zn, mask=mask, other=0)
            w = (q - ((qzg >> z_shift[None, :]) & MASK).to(tl.float32)) * sg.to(tl.float32)
        if PERM:
            out_k = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            out_k = offs_k
        tl.store(
            w_ptr + out_k[:, None] * N + offs_n[None, :],
            w.to(w_ptr.dtype.element_ty),
            mask=k_mask[:, None] & n_mask[None, :],
        )


def _fit_block_k(configs: list[triton.Config], named_args: Any = None, **kwargs: Any) -> list[triton.Config]:
    """Sorted-group mode needs every K tile inside one group: halve BLOCK_K until it divides GS."""
    gs = kwargs.get("GS", 0)
    out: dict[tuple, triton.Config] = {}
    for c in configs:
        meta = dict(c.kwargs)
        while gs and gs % meta["BLOCK_K"] and meta["BLOCK_K"] > 16:
            meta["BLOCK_K"] //= 2
        key = (tuple(sorted(meta.items())), c.num_warps, c.num_stages)
        out.setdefault(key, triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(out.values())


# decode: BLOCK_M = 16 (the smallest tl.dot tile), split-K so that M = 1 fills the GPU
_DECODE_CONFIGS = [
    cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, GROUP_M=8),
    cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=16, GROUP_M=8),
    cfg(8, 3, BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, SPLIT_K=8, GROUP_M=8),
    cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=16, GROUP_M=8),
]
_MID_CONFIGS = [
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
    cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
]
# under the interpreter: small tiles, and split-K on so the atomic path is tested
_INTERP_DECODE = cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)
_INTERP_MID = cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=8)

_KEY = ["M_BUCKET", "N", "K", "GS", "A_PERM", "BITS", "COMPACT", "REDUCE"]
_decode_tuned = autotune(
    _DECODE_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _fit_block_k}, reset_to_zero=["c_ptr"]
)(_w_int_matmul_kernel)
_mid_tuned = autotune(_MID_CONFIGS, _KEY, prune_configs_by={"early_config_prune": _fit_block_k})(_w_int_matmul_kernel)


@dataclass
class _Layout:
    gs: int  # 0: gather through g_idx; ONE_GROUP: per-channel; else sorted groups of gs rows
    perm: torch.Tensor | None  # act-order: the activation column read for each (repacked) weight row
    qweight: torch.Tensor  # the packed weight the kernel reads (rows sorted by group for act-order)


_LAYOUTS: dict[tuple[int, int], tuple[Any, Any, tuple[int, ...], _Layout]] = {}


def _repack_rows(qweight: torch.Tensor, perm: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` with its K rows (codes, packed along K) reordered by ``perm``."""
    per = 32 // bits
    k = perm.numel()
    codes = unpack_rows(qweight, bits, k)[perm].view(k // per, per, -1)
    out = torch.zeros_like(qweight)
    for j in range(per):
        out |= codes[:, j, :] << (j * bits)  # int32 shifts wrap into the sign bit like the packed words
    return out


def _analyse(qweight: torch.Tensor, g_idx: torch.Tensor, n_groups: int, bits: int) -> _Layout:
    k = g_idx.numel()
    if n_groups == 1:
        return _Layout(ONE_GROUP, None, qweight)
    g = g_idx.long()
    gs = int((g == 0).sum())  # the one host sync, once per g_idx
    if gs % 16 == 0 and k % (32 // bits) == 0:
        natural = torch.arange(k, device=g.device) // gs
        if torch.equal(g, natural):
            return _Layout(gs, None, qweight)
        perm = torch.argsort(g, stable=True)
        if REPACK_ACT_ORDER and torch.equal(g[perm], natural):
            return _Layout(gs, perm.to(torch.int32), _repack_rows(qweight, perm, bits))
    return _Layout(0, None, qweight)


def _layout(qweight: torch.Tensor, g_idx: torch.Tensor, n_groups: int, bits: int) -> _Layout:
    """Cached :func:`_analyse` per (qweight, g_idx) pair; dropped when either tensor dies or is modified."""
    key = (id(qweight), id(g_idx))
    state = (qweight._version, g_idx._version, qweight.data_ptr(), g_idx.data_ptr())
    hit = _LAYOUTS.get(key)
    if hit and hit[0]() is qweight and hit[1]() is g_idx and hit[2] == state:
        return hit[3]
    lay = _analyse(qweight, g_idx, n_groups, bits)

    def drop(_: Any, key: tuple[int, int] = key) -> None:
        _LAYOUTS.pop(key, None)

    _LAYOUTS[key] = (weakref.ref(qweight, drop), weakref.ref(g_idx, drop), state, lay)
    return lay


def dequantize_gptq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: Any,
    gs: int = 0,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """W^T [K, N] in ``dtype`` from the GPTQ buffers (one Triton pass over the packed weight).

    ``gs`` > 0: the rows are in sorted groups of ``gs`` (``ONE_GROUP``: one group) and ``g_idx`` is not
    read; 0: each row's group is gathered through ``g_idx``.  ``perm``: packed row k is W's row
    ``perm[k]`` (act-order's group-sorted copy), written there, so W^T comes out in the model's order."""
    K, N = g_idx.numel(), scales.shape[1]
    per = 32 // bits
    w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    bw, bn = (16, 128) if not interpreted() else (4, 32)
    bw = fit_words(bw, per, gs)
    _dequant_kernel[(triton.cdiv(triton.cdiv(K, per), bw), triton.cdiv(N, bn))](
        qweight,
        scales,
        qzeros,
        g_idx,
        perm if perm is not None else g_idx,
        w,
        N,
        K,
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        qzeros.stride(0),
        qzeros.stride(1),
        BITS=bits,
        GS=gs,
        PERM=perm is not None,
        BLOCK_W=bw,
        BLOCK_N=bn,
        num_warps=4,
    )
    return w


def w_int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int = 4,
    bias: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T`` with ``W`` [N, K] given in the GPTQ layout; output [M, N] in ``x.dtype``.

    ``block_m/n/k`` pin the fused kernel's tile (no autotuning, no dequantize + cuBLAS path)."""
    if 32 % bits:
        raise ValueError(f"the Triton kernel handles 2, 4 and 8 bits, not {bits}")
    M, K = x.shape
    N = scales.shape[1]
    if qweight.shape != (K * bits // 32, N) or g_idx.shape != (K,):
        raise ValueError(f"qweight {tuple(qweight.shape)} / g_idx {tuple(g_idx.shape)} do not match x [{M}, {K}]")
    pinned = block_m is not None or block_n is not None or block_k is not None
    if M == 0:
        return x.new_zeros(0, N)
    lay = _layout(qweight, g_idx, scales.shape[0], bits)
    if M >= DEQUANT_MIN_M and not pinned:
        # act-order: the group-sorted copy, each row written back to its place (no gather of x [M, K])
        w = dequantize_gptq(lay.qweight, scales, qzeros, g_idx, bits, x.dtype, lay.gs, lay.perm)
        return torch.addmm(bias.to(x.dtype), x, w) if bias is not None else x @ w
    if M <= GEMV_MAX_M and lay.gs and not pinned:  # batch-1 decode: the GEMV (no tl.dot, magic-number unpack)
        return gemv_gptq(x, lay.qweight, scales, qzeros, bits, lay.gs, lay.perm, bias)
    decode = M <= 16
    perm = lay.perm
    if perm is not None and not decode:
        x, perm = x.index_select(1, perm), None  # mid M: permute once, then contiguous activation tiles
    f32 = interpreted() or x.dtype == torch.float32
    flags = dict(
        BITS=bits, HAS_BIAS=bias is not None, F32_DOT=f32, GS=lay.gs, A_PERM=perm is not None, COMPACT=COMPACT_UNPACK
    )

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    def launch(out: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor, reduce: int, same: bool = False) -> None:
        args = (
            x,
            lay.qweight,
            scales,
            qzeros,
            g_idx,
            perm if perm is not None else g_idx,
            bias if bias is not None else scales,
            out,
            ws,
            cnt,
            M,
            N,
            K,
            m_bucket(M),
            x.stride(0),
            x.stride(1),
            lay.qweight.stride(0),
            lay.qweight.stride(1),
            scales.stride(0),
            scales.stride(1),
            qzeros.stride(0),
            qzeros.stride(1),
            out.stride(0),
            out.stride(1),
        )
        if pinned or interpreted():
            c = _INTERP_DECODE if decode else _INTERP_MID
            meta = dict(c.kwargs)
            if pinned:
                meta.update(BLOCK_M=max(16, block_m or 16), BLOCK_N=block_n or 64, BLOCK_K=block_k or 64)
            c = _fit_block_k([triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages)], GS=lay.gs)[0]
            _w_int_matmul_kernel[grid(c.kwargs)](
                *args, **flags, REDUCE=reduce, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages
            )
            return
        launch_tuned(_decode_tuned if decode else _mid_tuned, grid, same, out, reduce, *args, **flags)

    if decode:  # split-K
        return run_splitk("w4a16", launch, M, N, x.dtype, x.device)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    launch(out, out, out, 0)
    return out


@torch.library.custom_op("quantbench::w_int_linear", mutates_args=())
def _w_int_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`w_int_matmul` over any leading dims, as one opaque op for ``torch.compile``: dynamo cannot trace
    the wrapper (its cached ``g_idx`` analysis is data-dependent), so a compiled decode step (CUDA graphs)
    keeps the kernel as one node instead of falling back to eager."""
    shape = x.shape
    y = w_int_matmul(x.reshape(-1, shape[-1]), qweight, scales, qzeros, g_idx, bits, bias)
    return y.reshape(*shape[:-1], y.shape[-1])


@_w_int_linear_op.register_fake
def _w_int_linear_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], scales.shape[1])


def triton_int_linear(x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    """Forward of a packed integer weight (:class:`~quantbench.kernels.intq.IntPackedWeight`) through the
    Triton kernel (any leading dims); under ``torch.compile`` through the opaque custom op."""
    if torch.compiler.is_compiling():
        return _w_int_linear_op(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bits, layer.bias)
    shape = x.shape
    y = w_int_matmul(
        x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bits, layer.bias
    )
    return y.reshape(*shape[:-1], layer.out_features)
