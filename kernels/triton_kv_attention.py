"""Decode attention over a packed int4/int2 KV cache, dequantizing on the fly (Triton) + torch reference.

Layout (:mod:`quantbench.kernels.kvcache`, kv-uniform / per-token int format): codes
``[B, H_kv, T, D * bits / 8]`` uint8 (value i of a token in byte i // (8/bits), bit offset
(i % (8/bits)) * bits), fp16 ``scale``/``zero`` ``[B, H_kv, T, D / group]``; x = code * scale + zero.
One query token per (batch, query head); GQA maps query head h to KV head h // (H_q / H_kv).
The kernel streams BLOCK_T tokens at a time with an online softmax (flash-decoding, one split).
"""

from __future__ import annotations

import math

import torch

from quantbench.kernels.kvcache import decode_attention_ref, dequant_per_token

__all__ = ["decode_attention_ref", "dequant_per_token", "decode_attention_triton", "HAS_TRITON"]

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _kv_decode_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, O,
        T, sm_scale,
        s_qb, s_qh,
        s_kb, s_kh, s_kt,  # packed codes strides (K and V share the layout)
        s_sb, s_sh, s_st,  # scale/zero strides (shared)
        s_ob, s_oh,
        H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
        BITS: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // H_Q
        h = pid % H_Q
        hk = h // (H_Q // H_KV)
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + h * s_qh + d).to(tl.float32)
        m_i = tl.full([1], -float("inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        byte = d // PER
        shift = (d % PER) * BITS
        grp = d // GROUP
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < T
            m2 = tm[:, None]
            kc = tl.load(KC + b * s_kb + hk * s_kh + t[:, None] * s_kt + byte[None, :], mask=m2, other=0)
            ks = tl.load(KS + b * s_sb + hk * s_sh + t[:, None] * s_st + grp[None, :], mask=m2, other=0.0)
            kz = tl.load(KZ + b * s_sb + hk * s_sh + t[:, None] * s_st + grp[None, :], mask=m2, other=0.0)
            k = ((kc.to(tl.int32) >> shift[None, :]) & MASK).to(tl.float32) * ks.to(tl.float32) \
                + kz.to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * sm_scale
            s = tl.where(tm, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            vc = tl.load(VC + b * s_kb + hk * s_kh + t[:, None] * s_kt + byte[None, :], mask=m2, other=0)
            vs = tl.load(VS + b * s_sb + hk * s_sh + t[:, None] * s_st + grp[None, :], mask=m2, other=0.0)
            vz = tl.load(VZ + b * s_sb + hk * s_sh + t[:, None] * s_st + grp[None, :], mask=m2, other=0.0)
            v = ((vc.to(tl.int32) >> shift[None, :]) & MASK).to(tl.float32) * vs.to(tl.float32) \
                + vz.to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        tl.store(O + b * s_ob + h * s_oh + d, acc / l_i)


def decode_attention_triton(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
                            k_zero: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                            v_zero: torch.Tensor, bits: int, block_t: int = 64) -> torch.Tensor:
    """Triton decode attention over the packed layout (same contract as :func:`decode_attention_ref`)."""
    if not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if bits not in (2, 4, 8):
        raise ValueError(f"triton KV decode: bits must be 2, 4 or 8, got {bits}")
    B, Hq, D = q.shape
    _, Hkv, T, _ = k_codes.shape
    assert k_codes.stride() == v_codes.stride() and k_scale.stride() == v_scale.stride()
    assert k_scale.stride() == k_zero.stride() == v_zero.stride()
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    _kv_decode_kernel[(B * Hq,)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, out,
        T, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1),
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        out.stride(0), out.stride(1),
        H_Q=Hq, H_KV=Hkv, D=D, GROUP=D // k_scale.shape[-1], BITS=bits, BLOCK_T=block_t,
    )
    return out
