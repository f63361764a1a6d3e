"""ggml block formats against the PyPI ``gguf`` package (gguf-py's numpy reference of ggml-quants.c)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from quantbench.kernels import ggml

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# relative RMS error ceilings on N(0, 1) data (reference quantizers, no imatrix)
MAX_REL_RMSE = {"Q4_0": 0.095, "Q4_1": 0.085, "Q5_0": 0.047, "Q5_1": 0.042, "Q8_0": 0.006,
                "Q2_K": 0.31, "Q3_K": 0.16, "Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}


def _data(rows: int = 24, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0, :256] = 0.0                      # all-zero blocks
    x[1, :64] = 0.25                      # constant blocks
    x[2] *= 1e-3                          # tiny values
    x[3, ::7] *= 20.0                     # outliers
    x[4] = np.abs(x[4])                   # all positive
    x[5] = -np.abs(x[5])                  # all negative
    return x


def test_type_sizes_match_gguf() -> None:
    for t in ggml.QUANT_TYPES:
        assert GGML_QUANT_SIZES[getattr(GGMLQuantizationType, t)] == ggml.TYPES[t][:2]
        assert ggml.TYPES[t][2] == int(getattr(GGMLQuantizationType, t))


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_bytes_equal_gguf_quantize(qtype: str) -> None:
    x = _data()
    ours = ggml.quantize(x, qtype)
    ref = quants.quantize(x, getattr(GGMLQuantizationType, qtype))
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_gguf_cannot_quantize_kquants() -> None:
    # gguf 0.19 implements quantize only for the legacy types: k-quant bytes are checked through dequantize
    for t in KQUANTS:
        with pytest.raises(NotImplementedError):
            quants.quantize(_data(8, 256), getattr(GGMLQuantizationType, t))


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_dequantize_equals_gguf(qtype: str) -> None:
    x = _data()
    q = ggml.quantize(x, qtype)
    assert q.shape == (x.shape[0], ggml.row_bytes(qtype, x.shape[1]))
    ref = quants.dequantize(q, getattr(GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(ggml.dequantize(q, qtype, x.shape), ref)
    # zero blocks stay zero; constant 32-blocks are exact up to the fp16 scale in the legacy formats
    assert np.all(ref[0, :256] == 0)
    if qtype in LEGACY:
        np.testing.assert_allclose(ref[1, :64], 0.25, rtol=2e-3)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_reconstruction_error(qtype: str) -> None:
    x = np.random.default_rng(1).standard_normal((32, 1024)).astype(np.float32)
    y = ggml.dequantize(ggml.quantize(x, qtype), qtype, x.shape)
    rel = np.sqrt(((y - x) ** 2).mean() / (x**2).mean())
    assert rel < MAX_REL_RMSE[qtype]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *KQUANTS])
def test_imatrix_changes_result_and_lowers_weighted_error(qtype: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    imat = np.exp(2.0 * rng.standard_normal(512)).astype(np.float32)  # heavy-tailed column importances
    plain = ggml.dequantize(ggml.quantize(x, qtype), qtype, x.shape)
    weighted = ggml.dequantize(ggml.quantize(x, qtype, imatrix=imat), qtype, x.shape)
    assert not np.array_equal(plain, weighted)
    def werr(y: np.ndarray) -> float:
        return float((imat[None, :] * (y - x) ** 2).sum())
    assert werr(weighted) < 0.95 * werr(plain)


def test_q8_0_ignores_imatrix() -> None:
    x = _data()
    np.testing.assert_array_equal(ggml.quantize(x, "Q8_0"), ggml.quantize(x, "Q8_0", imatrix=np.ones(512)))


def test_row_length_checked() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ggml.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    assert ggml.row_bytes("Q5_0", 576) == 18 * 22


# --------------------------------------------------------------------------- C arithmetic order
# A scalar float32 transcription of the C search loops (each ``s += ...`` left to right, one rounding per
# operation), to check that the vectorized searches take the same branches.  Inputs lie on a Q4_1 grid,
# like requantized weights, where candidate errors tie to the last bit and the rounding order decides.

F = np.float32


def _grid(n_sub: int, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.002, 0.02, (n_sub, 1)).astype(np.float16).astype(F)
    m = -rng.uniform(0.0, 0.2, (n_sub, 1)).astype(np.float16).astype(F)
    return (d * rng.integers(0, 16, (n_sub, n)).astype(F) + m).astype(F)


def _scalar_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                 ) -> tuple[F, F, list[int]]:
    mn, mx, sw, sx = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, len(x)):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sw, sx = F(sw + w[i]), F(sx + F(w[i] * x[i]))
    mn = min(mn, F(0))
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)

    def err(sc: F, m: F, L: list[int]) -> F:
        e = F(0)
        for i in range(len(x)):
            dv = F(F(F(sc * F(L[i])) + m) - x[i])
            e = F(e + F(w[i] * F(dv * dv)))
        return e

    L = [min(nmax, max(0, int(np.rint(F(iscale * F(v - mn)))))) for v in x]
    best = err(scale, mn, L)
    for s in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(s))) + F(nmax)) / F(mx - mn))
        La = [min(nmax, max(0, int(np.rint(F(iscale * F(v - mn)))))) for v in x]
        sl = sl2 = sxl = F(0)
        for i in range(len(x)):
            wl = F(w[i] * F(La[i]))
            sl, sl2, sxl = F(sl + wl), F(sl2 + F(wl * F(La[i]))), F(sxl + F(wl * x[i]))
        D = F(F(sw * sl2) - F(sl * sl))
        if D > 0:
            ts, tm = F(F(F(sw * sxl) - F(sx * sl)) / D), F(F(F(sl2 * sx) - F(sl * sxl)) / D)
            if tm > 0:
                ts, tm = F(sxl / sl2), F(0)
            e = err(ts, tm, La)
            if e < best:
                L, best, scale, mn = La, e, ts, tm
    return scale, F(-mn), L


def test_ssum_is_left_to_right() -> None:
    a = np.array([[1.0, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, -1.0]], dtype=F)
    seq = F(0)
    for v in a[0]:
        seq = F(seq + v)
    assert ggml._ssum(a)[0] == seq == F(0)  # each 1e-8 is lost against 1.0, as in the C loop


def test_qkx2_search_matches_scalar_c_order() -> None:
    x = _grid(64, 32)
    av = np.sqrt(ggml._ssum(x * x) / F(32)).astype(F)
    w = (av[:, None] + np.abs(x)).astype(F)
    sc, mn, L = ggml.make_qkx_quants(x, 31, w, -0.5, 0.1, 15, False, False)
    moved = 0
    for b in range(x.shape[0]):
        s_ref, m_ref, l_ref = _scalar_qkx2(x[b], w[b], 31, -0.5, 0.1, 15)
        assert (sc[b], mn[b]) == (s_ref, m_ref), b
        assert L[b].tolist() == l_ref, b
        moved += m_ref != -min(F(0), x[b].min())
    assert moved > 0  # the case where min moves during the search (and so the range of later steps)
