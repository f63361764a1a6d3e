"""ggml (llama.cpp) block quantization formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q2_K..Q6_K.

Byte layouts are ggml's (``ggml-common.h``): each row of ``n`` weights is ``n / block_size`` blocks of
``type_size`` bytes, little-endian fp16 scales.  Quantizers follow llama.cpp's reference
(``quantize_row_*_ref``) and, given an importance matrix, the weighted searches of the
``quantize_row_*_impl`` functions (``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``,
``make_qkx3_quants``, ``make_qp_quants``).  Everything is numpy float32, vectorized over blocks (the
per-element loops of the C code become loops over the few positions of a block or search steps).
Every float32 operation keeps the C order and rounding: sums run left to right (:func:`_ssum`, not
numpy's pairwise ``sum``), products associate as written, and a search step that improves moves ``min``
for the later steps as the C loop does.  Requantized weights lie on a grid where candidate errors tie to
the last bit, so any other order picks other candidates: with this, every tensor of llama-quantize's
Q2_K..Q8_0 output for SmolLM2 is byte-identical (tests/methods/test_kquants_llamacpp.py).

Public API (per tensor, by type name, reusable by other methods):
``quantize(w [rows, cols], type, imatrix=None) -> uint8 [rows, row_bytes]``,
``dequantize(data, type, shape) -> float32``, ``row_bytes(type, cols)``, ``TYPES``.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)

#: type name -> (block size in weights, bytes per block, ggml type id)
TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (1, 4, 0),
    "F16": (1, 2, 1),
    "Q4_0": (32, 18, 2),
    "Q4_1": (32, 20, 3),
    "Q5_0": (32, 22, 6),
    "Q5_1": (32, 24, 7),
    "Q8_0": (32, 34, 8),
    "Q2_K": (256, 84, 10),
    "Q3_K": (256, 110, 11),
    "Q4_K": (256, 144, 12),
    "Q5_K": (256, 176, 13),
    "Q6_K": (256, 210, 14),
}
QUANT_TYPES = [t for t in TYPES if t not in ("F32", "F16")]


def row_bytes(qtype: str, cols: int) -> int:
    bs, ts, _ = TYPES[qtype]
    if cols % bs:
        raise ValueError(f"{qtype}: row length {cols} is not a multiple of the block size {bs}")
    return cols // bs * ts


def bits_per_weight(qtype: str) -> float:
    bs, ts, _ = TYPES[qtype]
    return 8.0 * ts / bs


# --------------------------------------------------------------------------- helpers


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even in float32 (the 1.5*2^23 trick)."""
    return np.rint(v.astype(F32)).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    """The fp16 bytes of v ([B] -> [B, 2] uint8)."""
    return np.ascontiguousarray(v.astype(F32).astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _f16r(v: np.ndarray) -> np.ndarray:
    """v rounded through fp16, as float32 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)))."""
    return v.astype(F32).astype(np.float16).astype(F32)


def _rd(a: np.ndarray | np.float32, b: np.ndarray) -> np.ndarray:
    """a / b in float32, 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, F32(1)), F32(0)).astype(F32)


def _ssum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32, as the C loops ``s += ...`` do.

    numpy's ``sum`` adds pairwise (a different rounding); the searches compare errors that often tie
    to the last bit (requantized inputs lie on a grid), so the order decides which candidate wins.
    """
    t = np.moveaxis(np.asarray(a, dtype=F32), -1, 0)
    acc = t[0].copy()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the largest |x| per row and the signed value there (first occurrence)."""
    i = np.abs(x).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(x, i, axis=-1)[..., 0]
    return np.abs(mx), mx


# --------------------------------------------------------------------------- scale searches (batched)


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int = 1, qw: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search over rows of x: returns (scale [B], L [B, n] in 0..2*nmax-1)."""
    x = x.astype(F32)
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = qw.astype(F32) if qw is not None else x * x  # rmse_type 1 (the only one the k-quants use)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        return lv, _ssum(w * x * lf), _ssum(w * lf * lf)

    iscale = (F32(-nmax) / mx).astype(F32)
    lv, sumlx, suml2 = trial(iscale)
    L = lv + nmax
    if rmse_type == 0:
        scale = (F32(1) / iscale).astype(F32)
    else:
        scale = _rd(sumlx, suml2)
        best = scale * sumlx
        for s in range(-9, 10):
            if s == 0:
                continue
            isc = (-(F32(nmax) + F32(0.1) * F32(s)) / mx).astype(F32)
            lv, slx, sl2 = trial(isc)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(better[:, None], lv + nmax, L)
            scale = np.where(better, _rd(slx, sl2), scale)
            best = np.where(better, scale * slx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K reference search (do_rmse): weights x^2, then up to 5 rounds of per-element refinement."""
    x = x.astype(F32)
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    iscale = (F32(-nmax) / mx).astype(F32)
    L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = _ssum(w * x * L.astype(F32))
    suml2 = _ssum(w * L.astype(F32) * L.astype(F32))
    active = np.ones(x.shape[0], dtype=bool)
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = active & (slx > 0)
            new_l = np.clip(_nearest_int(_rd(xi * sl2, slx)), -nmax, nmax - 1)
            ok &= new_l != L[:, i]
            nl = new_l.astype(F32)
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            ok &= (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(ok, new_l, L[:, i])
            sumlx = np.where(ok, slx2, sumlx)
            suml2 = np.where(ok, sl22, suml2)
            changed |= ok
        active &= changed
        if not active.any():
            break
    scale = _rd(sumlx, suml2)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, L + nmax)


def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, v3: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search: make_qkx2_quants (v3=False) / make_qkx3_quants (v3=True).

    Returns (scale [B], the_min [B] (>= 0, the value subtracted), L [B, n] in 0..nmax).
    """
    x = x.astype(F32)
    w = weights.astype(F32)
    mn = np.minimum(x.min(-1), F32(0))
    mx = x.max(-1)
    sum_w = _ssum(w)
    sum_x = _ssum(w * x)
    flat = (mx <= mn) if v3 else (mx == mn)
    rng = np.where(flat, F32(1), mx - mn).astype(F32)

    def err(scale: np.ndarray, mnv: np.ndarray, L: np.ndarray) -> np.ndarray:
        d = scale[:, None] * L.astype(F32) + mnv[:, None] - x
        d = np.abs(d) if use_mad else d * d
        return _ssum(w * d)

    iscale = (F32(nmax) / rng).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = err(scale, mn, L)
    for s in range(nstep + 1):
        # as in the C code, a step that improved moves ``min`` and so the range of the next steps
        cur_rng = np.where(flat, F32(1), mx - mn).astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            isc = ((F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)) / cur_rng).astype(F32)
            v = isc[:, None] * (x - mn[:, None])
            if v3:  # v may be inf or NaN here (min near max): only v > 0 counts, capped at nmax first
                la = _nearest_int(np.where(v > 0, np.minimum(v, F32(nmax)), F32(0)))
            else:  # nearest_int(+-inf or NaN) reads as a large negative int in ggml's bit trick: clamps to 0
                la = np.clip(_nearest_int(np.where(np.isfinite(v), v, F32(0))), 0, nmax)
        lf = la.astype(F32)
        sum_l = _ssum(w * lf)
        sum_l2 = _ssum(w * lf * lf)
        sum_xl = _ssum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        this_scale = _rd(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _rd(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_scale = np.where(pos, _rd(sum_xl, sum_l2), this_scale)
        this_min = np.where(pos, F32(0), this_min)
        cur = err(this_scale, this_min, la)
        better = ok & (cur < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(F32), (-mn).astype(F32), L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive-scale search for the sub-block scales/mins (k-quants with an imatrix)."""
    x = x.astype(F32)
    qw = qw.astype(F32)
    mx = x.max(-1)
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)

    def mse(isc: np.ndarray, clamp: bool) -> np.ndarray:
        lv = _nearest_int(isc[:, None] * x)
        if clamp:
            lv = np.minimum(nmax, lv)
        d = x - (F32(1) / isc)[:, None] * lv.astype(F32)
        return _ssum(qw * d * d)

    iscale = (F32(nmax) / mx).astype(F32)
    best = mse(iscale, False)
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = ((F32(0.1) * F32(s) + F32(nmax)) / mx).astype(F32)
        m = mse(isc, True)
        better = m < best
        best = np.where(better, m, best)
        iscale = np.where(better, isc, iscale)
    L = np.minimum(nmax, _nearest_int(iscale[:, None] * x))
    sumlx = _ssum(qw * x * L.astype(F32))
    suml2 = _ssum(qw * L.astype(F32) * L.astype(F32))
    active = np.ones(x.shape[0], dtype=bool)
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, li = qw[:, i], x[:, i], L[:, i].astype(F32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = np.minimum(nmax, _nearest_int(_rd(xi * sl2, slx)))
            ok &= new_l != L[:, i]
            nl = new_l.astype(F32)
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            ok &= slx2 * slx2 * suml2 > sumlx * sumlx * sl22
            L[:, i] = np.where(ok, new_l, L[:, i])
            sumlx = np.where(ok, slx2, sumlx)
            suml2 = np.where(ok, sl22, suml2)
            changed |= ok
        active &= changed
        if not active.any():
            break
    scale = _rd(sumlx, suml2)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, L)


# --------------------------------------------------------------------------- bit packing helpers


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)


def _qh32(q: np.ndarray) -> np.ndarray:
    """Fifth bits of 32 codes as one little-endian uint32 (bit j = code j) -> [B, 4] uint8."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(-1, dtype=np.uint32).astype("<u4")).view(np.uint8).reshape(-1, 4)


def _pack_2bit_k(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: per 128 codes, byte l holds codes l, l+32, l+64, l+96 at shifts 0,2,4,6."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of Q4_K and Q5_K (inverse of get_scale_min_k4)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _pack_q3_scales(l: np.ndarray) -> np.ndarray:  # noqa: E741
    """Q3_K: 16 6-bit scales (already +32) into 12 bytes."""
    l = l.astype(np.uint8)  # noqa: E741
    s = np.zeros((l.shape[0], 12), dtype=np.uint8)
    s[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = l >> 4
    for j in range(16):
        s[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return s


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    j = np.arange(16)
    low = np.where(j < 8, s[:, j % 8] & 0xF, s[:, j % 8] >> 4)
    hi = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (hi << 4)).astype(np.int32) - 32


# --------------------------------------------------------------------------- legacy types (block 32)


def _q4_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is None:
        _, mx = _signed_absmax(x)
        d = (mx / F32(-8)).astype(F32)
        idv = _rd(np.ones_like(d), d)
        q = np.minimum(15, np.trunc(x * idv[:, None] + F32(8.5)).astype(np.int32))
    else:
        d, q = make_qx_quants(x, 8, 1, qw)
    return np.concatenate([_f16(d), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    if qw is None:
        _, mx = _signed_absmax(x)
        d = (mx / F32(-16)).astype(F32)
        idv = _rd(np.ones_like(d), d)
        q = np.minimum(31, np.trunc(x * idv[:, None] + F32(16.5)).astype(np.int32))
    else:
        d, q = make_qx_quants(x, 16, 1, qw)
    return np.concatenate([_f16(d), _qh32(q), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _min_scale(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if qw is None:
        mn, mx = x.min(-1), x.max(-1)
        d = ((mx - mn) / F32(nmax)).astype(F32)
        idv = _rd(np.ones_like(d), d)
        q = np.trunc((x - mn[:, None]) * idv[:, None] + F32(0.5)).astype(np.int32)
        return d, mn, np.minimum(nmax, q) if nmax == 15 else q
    d, m, q = make_qkx_quants(x, nmax, qw, -0.9, 0.05, 36, False, True)
    return d, -m, q


def _q4_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, m, q = _min_scale(x, qw, 15)
    return np.concatenate([_f16(d), _f16(m), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q5_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, m, q = _min_scale(x, qw, 31)
    return np.concatenate([_f16(d), _f16(m), _qh32(q), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q8_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d = (np.abs(x).max(-1) / F32(127)).astype(F32)
    v = x * _rd(np.ones_like(d), d)[:, None]
    a = np.abs(v)
    fl = np.floor(a)
    q = (np.sign(v) * (fl + np.floor(2 * (a - fl)))).astype(np.int8)  # roundf: half away from zero
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=1)


# --------------------------------------------------------------------------- k-quants (block 256)


def _sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    return (F32(factor) * _ssum(x * x) / F32(QK_K)).astype(F32)


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    if qw is None:
        sc, mn, _ = make_qkx_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True, False)
        sc, mn = sc.reshape(B, 16), mn.reshape(B, 16)
        max_scale, max_min = sc.max(-1), mn.max(-1)
        ls = np.where(max_scale[:, None] > 0, _nearest_int(_rd(F32(15), max_scale)[:, None] * sc), 0)
        lm = np.where(max_min[:, None] > 0, _nearest_int(_rd(F32(15), max_min)[:, None] * mn), 0)
        d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
        dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    else:
        sigma2 = _sigma2(x, 1.0)
        wts = (qw.reshape(B, 16, 16) * np.sqrt(sigma2[:, None, None] + x.reshape(B, 16, 16) ** 2)).astype(F32)
        sw = _ssum(wts)
        sc, mn, _ = make_qkx_quants(xs, 3, wts.reshape(-1, 16), -0.9, 0.05, 36, False, True)
        d, ls = make_qp_quants(sc.reshape(B, 16), 15, sw)
        dmin, lm = make_qp_quants(mn.reshape(B, 16), 15, sw)
    scales = (ls.astype(np.uint8) & 0xF) | (lm.astype(np.uint8) << 4)
    dq = _f16r(d)[:, None] * (scales & 0xF).astype(F32)
    mq = _f16r(dmin)[:, None] * (scales >> 4).astype(F32)
    L = _nearest_int((x.reshape(B, 16, 16) + mq[..., None]) / np.where(dq == 0, F32(1), dq)[..., None])
    L = np.where(dq[..., None] != 0, np.clip(L, 0, 3), _requant_fallback_k(xs, 3, B, 16))
    return np.concatenate([scales, _pack_2bit_k(L.reshape(B, QK_K)), _f16(d), _f16(dmin)], axis=1)


def _requant_fallback_k(xs: np.ndarray, nmax: int, B: int, n: int) -> np.ndarray:
    # where a sub-block scale quantizes to 0 the C code keeps L from the search; those codes multiply a
    # zero scale, so any value dequantizes identically.  Reproduce the search's codes for byte fidelity.
    _, _, L = make_qkx_quants(xs, nmax, np.abs(xs), -0.5, 0.1, 15, True, False)
    return L.reshape(B, -1, n)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    if qw is None:
        sc, L0 = make_q3_quants(xs, 4)
        sc = sc.reshape(B, 16)
        _, max_scale = _signed_absmax(sc)
        nz = max_scale != 0
        iscale = _rd(F32(-32) * np.ones_like(max_scale), max_scale)
        ls = np.clip(_nearest_int(iscale[:, None] * sc), -32, 31) + 32
        ls = np.where(nz[:, None], ls, 0)
        d = np.where(nz, _rd(np.ones_like(iscale), iscale), F32(0))
        scales = np.where(nz[:, None], _pack_q3_scales(ls), 0).astype(np.uint8)
    else:
        sigma2 = _sigma2(x, 2.0)
        wts = (qw.reshape(B, 16, 16) * np.sqrt(sigma2[:, None, None] + x.reshape(B, 16, 16) ** 2)).astype(F32)
        sw = _ssum(wts)
        sc, L0 = make_qx_quants(xs, 4, 1, wts.reshape(-1, 16))
        d, ls = make_qx_quants(sc.reshape(B, 16), 32, 1, sw)
        scales = _pack_q3_scales(ls)
    scv = _unpack_q3_scales(scales)
    dq = _f16r(d)[:, None] * scv.astype(F32)
    L = np.clip(_nearest_int(x.reshape(B, 16, 16) / np.where(dq == 0, F32(1), dq)[..., None]), -4, 3) + 4
    L = np.where(dq[..., None] != 0, L, L0.reshape(B, 16, 16)).reshape(B, QK_K)
    # high bit of code j goes to hmask[j % 32], bit j // 32
    hi = (L > 3).astype(np.uint8).reshape(B, 8, 32)
    hmask = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _pack_2bit_k(L), scales, _f16(d)], axis=1)


def _k4_search(x: np.ndarray, qw: np.ndarray | None, nmax: int, ref_params: tuple[float, float, int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: sub-block (scale, min) search and 6-bit super-block quantization of both."""
    B = x.shape[0]
    xb = x.reshape(B, 8, 32)
    if qw is None:
        av_x = np.sqrt(_ssum(xb * xb) / F32(32)).astype(F32)
        wts = av_x[..., None] + np.abs(xb)
        sc, mn, _ = make_qkx_quants(xb.reshape(-1, 32), nmax, wts.reshape(-1, 32), *ref_params, False, False)
        sc, mn = sc.reshape(B, 8), mn.reshape(B, 8)
        max_scale, max_min = sc.max(-1), mn.max(-1)
        inv_s = np.where(max_scale > 0, _rd(F32(63) * np.ones_like(max_scale), max_scale), F32(0))
        inv_m = np.where(max_min > 0, _rd(F32(63) * np.ones_like(max_min), max_min), F32(0))
        ls = np.minimum(63, _nearest_int(inv_s[:, None] * sc))
        lm = np.minimum(63, _nearest_int(inv_m[:, None] * mn))
        d, dmin = max_scale / F32(63), max_min / F32(63)
    else:
        sigma2 = _sigma2(x, 2.0)
        wts = (qw.reshape(B, 8, 32) * np.sqrt(sigma2[:, None, None] + xb * xb)).astype(F32)
        sw = _ssum(wts)
        sc, mn, _ = make_qkx_quants(xb.reshape(-1, 32), nmax, wts.reshape(-1, 32), -0.9, 0.05, 36, False, True)
        d, ls = make_qp_quants(sc.reshape(B, 8), 63, sw)
        dmin, lm = make_qp_quants(mn.reshape(B, 8), 63, sw)
    dq = _f16r(d)[:, None] * ls.astype(F32)
    mq = _f16r(dmin)[:, None] * lm.astype(F32)
    L = np.clip(_nearest_int((xb + mq[..., None]) / np.where(dq == 0, F32(1), dq)[..., None]), 0, nmax)
    L = np.where(dq[..., None] != 0, L, 0).reshape(B, QK_K)
    return d.astype(F32), dmin.astype(F32), _pack_k4_scales(ls, lm), L


def _q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, scales, L = _k4_search(x, qw, 15, (-1.0, 0.1, 20))
    q = L.reshape(-1, 4, 2, 32)
    qs = _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_f16(d), _f16(dmin), scales, qs], axis=1)


def _q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, scales, L = _k4_search(x, qw, 31, (-0.5, 0.1, 15))
    q = L.reshape(-1, 4, 2, 32)
    qs = _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
    hb = (q >> 4).astype(np.uint8).reshape(-1, 8, 32)  # sub-block k's fifth bits -> qh bit k
    qh = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    return np.concatenate([_f16(d), _f16(dmin), scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    sc, L0 = make_qx_quants(xs, 32, 1, None if qw is None else qw.reshape(-1, 16))
    sc = sc.reshape(B, 16)
    amax, max_scale = _signed_absmax(sc)
    zero = amax < GROUP_MAX_EPS
    iscale = _rd(F32(-128) * np.ones_like(max_scale), np.where(zero, F32(1), max_scale))
    d = _rd(np.ones_like(iscale), iscale)
    ls = np.minimum(127, _nearest_int(iscale[:, None] * sc)).astype(np.int8)
    dq = _f16r(d)[:, None] * ls.astype(F32)
    L = np.clip(_nearest_int(x.reshape(B, 16, 16) / np.where(dq == 0, F32(1), dq)[..., None]), -32, 31) + 32
    L = np.where(dq[..., None] != 0, L, L0.reshape(B, 16, 16)).reshape(B, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([_pack_nibbles(L[:, :, 0], L[:, :, 2]), _pack_nibbles(L[:, :, 1], L[:, :, 3])], axis=2)
    h = L >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), ls.view(np.uint8), _f16(d)], axis=1)
    out[zero] = 0
    return out


_QUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
               "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_NO_IMATRIX = {"Q8_0"}  # quantize_q8_0 ignores quant_weights


def _legacy_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Legacy *_impl weights: qw * sqrt(sigma2 + x^2) with sigma2 = mean x^2 over the whole row."""
    sigma2 = _ssum(x * x) / F32(x.shape[1])
    return (qw[None, :] * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


def quantize(w: np.ndarray | torch.Tensor, qtype: str, imatrix: np.ndarray | torch.Tensor | None = None,
             chunk_rows: int | None = None) -> np.ndarray:
    """Quantize a [rows, cols] float tensor to ggml ``qtype``: uint8 [rows, row_bytes(qtype, cols)].

    ``imatrix`` ([cols], per-column importance E[x^2]) switches to llama.cpp's weighted searches.
    """
    if isinstance(w, torch.Tensor):
        w = w.detach().float().cpu().numpy()
    if isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().float().cpu().numpy()
    x = np.ascontiguousarray(w, dtype=F32)
    if x.ndim == 1:
        x = x[None]
    rows, cols = x.shape
    if qtype == "F32":
        return x.view(np.uint8).reshape(rows, -1).copy()
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8).reshape(rows, -1).copy()
    bs, ts, _ = TYPES[qtype]
    row_bytes(qtype, cols)
    fn = _QUANTIZERS[qtype]
    qw = None if imatrix is None or qtype in _NO_IMATRIX else np.asarray(imatrix, dtype=F32)
    out = np.empty((rows, cols // bs * ts), dtype=np.uint8)
    step = chunk_rows or max(1, (1 << 18) // cols)
    for r0 in range(0, rows, step):
        xr = x[r0 : r0 + step]
        n = xr.shape[0]
        if qw is None:
            q = fn(xr.reshape(-1, bs), None)
        elif bs == 32:
            q = fn(xr.reshape(-1, bs), _legacy_weights(xr, qw).reshape(-1, bs))
        else:
            q = fn(xr.reshape(-1, bs), np.broadcast_to(qw, xr.shape).reshape(-1, bs))
        out[r0 : r0 + n] = q.reshape(n, -1)
    return out


# --------------------------------------------------------------------------- dequantization


def _h(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _lo_hi(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(qh).view("<u4").astype(np.uint32)
    return ((u >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _dq_blocks(b: np.ndarray, qtype: str) -> np.ndarray:
    B = b.shape[0]
    if qtype == "Q4_0":
        return _h(b[:, 0:2]) * (_lo_hi(b[:, 2:]).astype(F32) - 8)
    if qtype == "Q4_1":
        return _h(b[:, 0:2]) * _lo_hi(b[:, 4:]).astype(F32) + _h(b[:, 2:4])
    if qtype == "Q5_0":
        q = _lo_hi(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
        return _h(b[:, 0:2]) * (q.astype(F32) - 16)
    if qtype == "Q5_1":
        q = _lo_hi(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
        return _h(b[:, 0:2]) * q.astype(F32) + _h(b[:, 2:4])
    if qtype == "Q8_0":
        return _h(b[:, 0:2]) * b[:, 2:].view(np.int8).astype(F32)
    if qtype == "Q2_K":
        scales, qs, d, dmin = b[:, :16], b[:, 16:80], _h(b[:, 80:82])[:, 0], _h(b[:, 82:84])[:, 0]
        q = (qs.reshape(B, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = q.reshape(B, 16, 16).astype(F32)
        return (d[:, None, None] * (scales & 0xF).astype(F32)[..., None] * q
                - dmin[:, None, None] * (scales >> 4).astype(F32)[..., None]).reshape(B, QK_K)
    if qtype == "Q3_K":
        hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _h(b[:, 108:110])[:, 0]
        q = (qs.reshape(B, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        h = (hmask.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = q.reshape(B, 8, 32).astype(np.int32) - 4 * (1 - h.astype(np.int32))
        sc = _unpack_q3_scales(scales).astype(F32)
        return (d[:, None, None] * sc.reshape(B, 16, 1) * q.reshape(B, 16, 16).astype(F32)).reshape(B, QK_K)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _h(b[:, 0:2])[:, 0], _h(b[:, 2:4])[:, 0]
        sc, mn = _unpack_k4_scales(b[:, 4:16])
        qs = b[:, 48:] if qtype == "Q5_K" else b[:, 16:]
        q = np.stack([qs.reshape(B, 4, 32) & 0xF, qs.reshape(B, 4, 32) >> 4], axis=2).reshape(B, 8, 32)
        if qtype == "Q5_K":
            qh = b[:, 16:48]
            q = q | (((qh.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << 4)
        return (d[:, None, None] * sc.astype(F32)[..., None] * q.astype(F32)
                - dmin[:, None, None] * mn.astype(F32)[..., None]).reshape(B, QK_K)
    if qtype == "Q6_K":
        ql, qh = b[:, :128].reshape(B, 2, 64), b[:, 128:192].reshape(B, 2, 32)
        sc, d = b[:, 192:208], _h(b[:, 208:210])[:, 0]
        lo = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
        hi = (qh[:, :, None, :] >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).astype(F32).reshape(B, 16, 16) - 32
        return (d[:, None, None] * sc.view(np.int8).astype(F32)[..., None] * q).reshape(B, QK_K)
    raise ValueError(f"unknown ggml type {qtype}")


def dequantize(data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize ggml bytes (uint8, [rows, row_bytes] or flat) to float32 of ``shape``."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if qtype == "F32":
        return b.view(F32).reshape(shape).copy()
    if qtype == "F16":
        return b.view(np.float16).astype(F32).reshape(shape)
    bs, ts, _ = TYPES[qtype]
    return _dq_blocks(b.reshape(-1, ts), qtype).reshape(shape)


def dequantize_torch(data: torch.Tensor, qtype: str, shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch wrapper of :func:`dequantize` (the reference path used by GGMLLinear)."""
    return torch.from_numpy(dequantize(data, qtype, shape)).to(dtype)
