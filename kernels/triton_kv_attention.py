"""Decode attention over a packed int4/int2 KV cache, dequantizing on the fly (Triton) + torch reference.

Layout (:mod:`quantbench.kernels.kvcache`, kv-uniform / per-token int format): codes
``[B, H_kv, T, D * bits / 8]`` uint8 (value i of a token in byte i // (8/bits), bit offset
(i % (8/bits)) * bits), fp16 ``scale``/``zero`` ``[B, H_kv, T, D / group]``; x = code * scale + zero.
One query token per (batch, query head); GQA maps query head h to KV head h // (H_q / H_kv).
Flash-decoding: the T axis is split over ``num_splits`` programs per (batch, KV head); each
streams BLOCK_T tokens at a time with an online softmax and writes its partial output (normalized)
and log-sum-exp, and a second small kernel merges the splits.  At B = 1 and 32 heads one program
per head left 100 of 132 SMs idle and walked 32k tokens serially; the splits fill the GPU.
Each program serves all the query heads of one KV head (GQA), so a K/V token is read and
dequantized once for them; scores and P @ V run as [16, BLOCK_T] / [16, D] ``tl.dot`` tiles in TF32 on a GPU
(fp32 accumulation; ``_DOT_PREC["gpu"] = "tf32x3"`` restores fp32-accurate dots).  H200, docs/gpu.md session 9:
at T = 32k, B = 1 the 3xTF32 dots took 0.107 ms and TF32 0.080 ms (fp16 SDPA 0.127 / 0.143 ms in the same
runs), at a relative error of 7e-4 against the float64 reference (3xTF32: 3e-7) -- far below what the 4-bit
codes themselves change, and the precision of the fp16 attention it replaces.
"""

from __future__ import annotations

import math

import torch

from .kvcache import decode_attention_ref, dequant_per_token

__all__ = ["decode_attention_ref", "dequant_per_token", "decode_attention_triton", "HAS_TRITON"]

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from .triton_tuning import autotune, interpreted, num_sms

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _kv_decode_split_kernel(
        Q,
        KC,
        KS,
        KZ,
        VC,
        VS,
        VZ,
        PO,
        PL,
        T,
        T_SPLIT,
        T_BUCKET,  # autotune key only: T_SPLIT rounded up to a power of two
        sm_scale,
        s_qb,
        s_qh,
        s_kb,
        s_kh,
        s_kt,  # packed codes strides (K and V share the layout)
        s_sb,
        s_sh,
        s_st,  # scale/zero strides (shared)
        NUM_SPLITS,
        H_Q: tl.constexpr,
        H_KV: tl.constexpr,
        D: tl.constexpr,
        GROUP: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """One (batch, KV head, T split): all H_Q / H_KV query heads of the KV head at once, so each
        K/V token is loaded and dequantized once; scores and P @ V are [BLOCK_H, .] tl.dots."""
        pid = tl.program_id(0)  # b * H_KV + hk
        split = tl.program_id(1)
        b = pid // H_KV
        hk = pid % H_KV
        G: tl.constexpr = H_Q // H_KV
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        hh = tl.arange(0, BLOCK_H)
        hmask = hh < G
        h = hk * G + hh
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=hmask[:, None], other=0.0)
        q = q.to(tl.float32) * sm_scale  # [BLOCK_H, D]; padded rows are 0
        m_i = tl.full([BLOCK_H], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        NG: tl.constexpr = D // GROUP
        DB: tl.constexpr = D // PER
        jb = tl.arange(0, DB)  # byte of a token's packed codes
        jg = tl.arange(0, NG)  # scale/zero group
        shifts = tl.arange(0, PER) * BITS
        kv_off = b.to(tl.int64) * s_kb + hk * s_kh
        sz_off = b.to(tl.int64) * s_sb + hk * s_sh
        t_lo = split * T_SPLIT
        t_hi = min(t_lo + T_SPLIT, T)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < t_hi
            m2 = tm[:, None]
            # compact loads (each byte / scale once), unpacked and broadcast in registers
            code_ptr = t[:, None] * s_kt + jb[None, :]
            sz_ptr = t[:, None] * s_st + jg[None, :]
            kc = tl.load(KC + kv_off + code_ptr, mask=m2, other=0)
            ks = tl.load(KS + sz_off + sz_ptr, mask=m2, other=0.0).to(tl.float32)
            kz = tl.load(KZ + sz_off + sz_ptr, mask=m2, other=0.0).to(tl.float32)
            kq = tl.reshape((kc.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_T, D))
            ks = tl.reshape(tl.broadcast_to(ks[:, :, None], (BLOCK_T, NG, GROUP)), (BLOCK_T, D))
            kz = tl.reshape(tl.broadcast_to(kz[:, :, None], (BLOCK_T, NG, GROUP)), (BLOCK_T, D))
            k = kq.to(tl.float32) * ks + kz  # [BLOCK_T, D]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_H, BLOCK_T]
            s = tl.where(tm[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            vc = tl.load(VC + kv_off + code_ptr, mask=m2, other=0)
            vs = tl.load(VS + sz_off + sz_ptr, mask=m2, other=0.0).to(tl.float32)
            vz = tl.load(VZ + sz_off + sz_ptr, mask=m2, other=0.0).to(tl.float32)
            vq = tl.reshape((vc.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_T, D))
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_T, NG, GROUP)), (BLOCK_T, D))
            vz = tl.reshape(tl.broadcast_to(vz[:, :, None], (BLOCK_T, NG, GROUP)), (BLOCK_T, D))
            v = vq.to(tl.float32) * vs + vz
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
            m_i = m_new
        # every split holds at least one token (the host sizes them), so l_i > 0
        row = (b * H_Q + h) * NUM_SPLITS + split
        tl.store(PO + row[:, None] * D + d[None, :], acc / l_i[:, None], mask=hmask[:, None])
        tl.store(PL + row, m_i + tl.log(l_i), mask=hmask)

    @triton.jit
    def _kv_decode_merge_kernel(
        PO, PL, O, s_ob, s_oh, NUM_SPLITS, H_Q: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr
    ):
        pid = tl.program_id(0)
        b = pid // H_Q
        h = pid % H_Q
        sp = tl.arange(0, SPLITS_P2)
        smask = sp < NUM_SPLITS
        d = tl.arange(0, D)
        lse = tl.load(PL + pid * NUM_SPLITS + sp, mask=smask, other=-float("inf"))
        w = tl.exp(lse - tl.max(lse, axis=0))
        o = tl.load(PO + (pid * NUM_SPLITS + sp)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        tl.store(O + b * s_ob + h * s_oh + d, tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0))


_DOT_PREC = {"gpu": "tf32"}  # "tf32x3": fp32-accurate dots (1.34x the time at T = 32k on an H200)

if HAS_TRITON:
    # warps x stages only (BLOCK_T sets the host-side split sizes); the kernel only writes its
    # partials, so benchmarking it repeatedly is harmless.  At BLOCK_T = 64 on sm_90: 4 warps
    # 235 regs/thread, 8 warps 188 (no spills either way), 60-72 KiB shared memory.
    _kv_decode_split_tuned = autotune(
        [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (3, 2)],
        ["T_BUCKET", "H_Q", "H_KV", "D", "GROUP", "BITS", "BLOCK_T", "DOT_PREC"],
    )(_kv_decode_split_kernel)


def _num_splits(B: int, Hkv: int, T: int, block_t: int, device: torch.device) -> int:
    """Splits of the T axis: about 4 programs per SM, each with at least 4 BLOCK_T tiles."""
    want = max(1, -(-4 * num_sms(device) // (B * Hkv)))
    return max(1, min(want, T // (4 * block_t)))


def decode_attention_triton(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    block_t: int = 64,
    num_splits: int | None = None,
    dot_prec: str | None = None,
) -> torch.Tensor:
    """Triton decode attention over the packed layout (same contract as :func:`decode_attention_ref`).

    ``num_splits`` (default: sized to the GPU) is how many programs share each head's T axis; ``dot_prec``
    the GPU dots' precision (default ``_DOT_PREC["gpu"]``: TF32; ``"tf32x3"``: fp32-accurate)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if bits not in (2, 4, 8):
        raise ValueError(f"triton KV decode: bits must be 2, 4 or 8, got {bits}")
    B, Hq, D = q.shape
    _, Hkv, T, _ = k_codes.shape
    assert k_codes.stride() == v_codes.stride() and k_scale.stride() == v_scale.stride()
    assert k_scale.stride() == k_zero.stride() == v_zero.stride()
    splits = num_splits or _num_splits(B, Hkv, T, block_t, q.device)
    t_split = -(-max(T, 1) // splits)
    t_split = -(-t_split // block_t) * block_t
    splits = max(1, -(-T // t_split))  # no empty split
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    part_o = torch.empty(B * Hq * splits, D, dtype=torch.float32, device=q.device)
    part_l = torch.empty(B * Hq * splits, dtype=torch.float32, device=q.device)
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads do not share {Hkv} KV heads evenly")
    # scores and P @ V on tensor cores in TF32, fp32 accumulation (IEEE fp32 in the interpreter and on the CPU)
    prec = "ieee" if interpreted() or q.device.type != "cuda" else dot_prec or _DOT_PREC["gpu"]

    def launch(prec: str) -> None:
        kernel = _kv_decode_split_kernel if interpreted() else _kv_decode_split_tuned
        kernel[(B * Hkv, splits)](
            q,
            k_codes,
            k_scale,
            k_zero,
            v_codes,
            v_scale,
            v_zero,
            part_o,
            part_l,
            T,
            t_split,
            triton.next_power_of_2(t_split),
            1.0 / math.sqrt(D),
            q.stride(0),
            q.stride(1),
            k_codes.stride(0),
            k_codes.stride(1),
            k_codes.stride(2),
            k_scale.stride(0),
            k_scale.stride(1),
            k_scale.stride(2),
            splits,
            H_Q=Hq,
            H_KV=Hkv,
            D=D,
            GROUP=D // k_scale.shape[-1],
            BITS=bits,
            BLOCK_T=block_t,
            BLOCK_H=max(16, triton.next_power_of_2(Hq // Hkv)),
            DOT_PREC=prec,
        )

    try:
        launch(prec)
    except Exception:  # a Triton without this dot precision: IEEE fp32 (FMA) dots, slower
        if prec == "ieee":
            raise
        _DOT_PREC["gpu"] = "ieee"
        launch("ieee")
    _kv_decode_merge_kernel[(B * Hq,)](
        part_o,
        part_l,
        out,
        out.stride(0),
        out.stride(1),
        splits,
        H_Q=Hq,
        D=D,
        SPLITS_P2=triton.next_power_of_2(splits),
    )
    return out
