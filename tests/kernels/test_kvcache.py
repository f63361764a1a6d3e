"""KV quantization primitives: reference formulas, packing, NUQ k-means, dense-and-sparse, sink, cache."""

import pytest
import torch

from quantbench.kernels.kvcache import (
    Encoded,
    KVSpec,
    QuantizedKVCache,
    RopeTable,
    apply_rope,
    byte_lut,
    decode,
    encode,
    key_outlier_mask,
    kv_bytes,
    lookup_codes,
    pack_codes,
    q_norm,
    qdq_sequence,
    unpack_codes,
    weighted_kmeans_1d,
)
from quantbench.methods.kvcalc import kv_cache_bytes


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_size(bits):
    c = torch.randint(0, 2**bits, (2, 3, 5, 64), generator=torch.Generator().manual_seed(bits))
    p = pack_codes(c, bits)
    assert p.numel() * p.element_size() == c.numel() * bits // 8
    assert torch.equal(unpack_codes(p, bits, 64), c.long())
    if bits == 4:  # exact byte layout: value 0 in the low nibble
        assert p[0, 0, 0, 0].item() == (c[0, 0, 0, 0] | (c[0, 0, 0, 1] << 4)).item()


def test_per_token_groups_match_reference_formula():
    x = _x(1, 2, 7, 32)
    spec = KVSpec("int", "token", 4, 16)
    y = decode(encode(x, spec), spec)
    xg = x.reshape(1, 2, 7, 2, 16)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = (mx - mn) / 15
    ref = (((xg - mn) / s).round().clamp(0, 15) * s + mn).reshape(x.shape)
    assert (y - ref).abs().max() < 2e-3 * x.abs().max()  # fp16 scale/zero rounding only
    assert ((y - x).abs() <= s.repeat_interleave(16, -1).reshape(x.shape) / 2 + 2e-3).all()


def test_per_channel_groups_over_tokens():
    x = _x(1, 2, 64, 8)
    x[..., 3] *= 50  # outlier channel: per-channel keeps the other channels precise
    spec = KVSpec("int", "channel", 2, 32)
    y = decode(encode(x, spec), spec)
    for g in range(2):
        blk = x[:, :, 32 * g : 32 * (g + 1)]
        s = (blk.amax(2) - blk.amin(2)) / 3
        assert ((y[:, :, 32 * g : 32 * (g + 1)] - blk).abs() <= s.unsqueeze(2) / 2 + 1e-2 * s.unsqueeze(2)).all()
    tok = KVSpec("int", "token", 2, -1)
    err_c = (y - x)[..., [0, 1, 2, 4, 5, 6, 7]].pow(2).mean()
    err_t = (decode(encode(x, tok), tok) - x)[..., [0, 1, 2, 4, 5, 6, 7]].pow(2).mean()
    assert err_c < 0.2 * err_t


def test_weighted_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-0.8, -0.1, 0.3, 0.9])
    x = centers.repeat_interleave(500) + 0.01 * torch.randn(2000, generator=g)
    c = weighted_kmeans_1d(x, None, 4)
    assert (c - centers).abs().max() < 0.01
    # weights pull the centroid: two points, weight 9:1 -> centroid at the weighted mean
    c1 = weighted_kmeans_1d(torch.tensor([0.0, 1.0]), torch.tensor([9.0, 1.0]), 1)
    assert abs(c1.item() - 0.1) < 1e-5


def test_q_norm_codes_against_original_table_and_reconstruction_keeps_mean_and_std():
    """KVQuant's Q-Norm: codes are nearest-centroid against the k-means table; the reconstruction
    ``table[code] * scale + offset`` has the calibration data's mean and std (2 bits, N(0, 0.35^2))."""
    x = (0.35 * _x(20000)).clamp(-1, 1)
    c = weighted_kmeans_1d(x, None, 4)
    scale, offset = q_norm(c, x)
    spec = KVSpec("nuq", "token", 2, centroids=c, qnorm=(scale, offset))
    xb = x.reshape(1, 1, 200, 100)
    e = encode(xb, spec)  # the cache's codes: nearest centroid of the per-token normalized data
    lo, hi = (t.float() for t in e.scales)
    xn = (xb - (hi + lo) / 2) / ((hi - lo) / 2)
    ref_codes = (xn.unsqueeze(-1) - c).abs().argmin(-1)  # nearest centroid of the ORIGINAL table
    assert torch.equal(unpack_codes(e.codes, 2, 100), ref_codes)
    torch.testing.assert_close(decode(e, spec), (c * scale + offset)[ref_codes] * (hi - lo) / 2 + (hi + lo) / 2)
    # on the calibration data itself: the reconstruction's std and mean are the data's
    codes = (x.unsqueeze(-1) - c).abs().argmin(-1)
    rec = spec.table()[codes]
    assert abs(rec.std().item() - x.std().item()) < 1e-3 and abs(rec.mean().item() - x.mean().item()) < 1e-3
    assert abs(c[codes].std().item() - x.std().item()) > 5e-3  # without Q-Norm it does not (the test can fail)
    assert spec.static_bytes() == 4 * 2 + 8


def _nuq_value_spec(bits=2, frac=0.1):
    return KVSpec("nuq", "token", bits, outlier_frac=frac, sink=1, centroids=torch.linspace(-1, 1, 2**bits))


def test_dense_and_sparse_keeps_the_largest_and_smallest_of_each_token():
    x = _x(1, 2, 9, 40)
    spec = _nuq_value_spec(frac=0.1)  # 0.05 * 80 = 4 largest and 4 smallest of each token (2 heads)
    e = encode(x, spec)
    assert e.out_idx.numel() == 9 * 8
    xt = x.transpose(1, 2).reshape(9, 80)  # a token's vector over all heads
    ref = torch.zeros_like(xt, dtype=torch.bool)
    ref.scatter_(-1, xt.topk(4, -1).indices, True).scatter_(-1, xt.topk(4, -1, largest=False).indices, True)
    mask = ref.reshape(1, 9, 2, 40).transpose(1, 2)
    assert torch.equal(e.out_idx.long(), mask.permute(2, 0, 1, 3).flatten().nonzero().flatten())  # token-major
    y = decode(e, spec)
    assert torch.equal(y[mask], x[mask].half().float())  # outliers exact in fp16
    # the per-token range is the inliers' min/max: every inlier lies within it, outliers outside
    lo = xt.masked_fill(ref, torch.inf).amin(-1, keepdim=True)
    hi = xt.masked_fill(ref, -torch.inf).amax(-1, keepdim=True)
    assert ((xt[ref].view(9, 8) >= hi) | (xt[ref].view(9, 8) <= lo)).all()
    assert torch.equal(e.scales[0].flatten(), lo.flatten().half())
    assert torch.equal(e.scales[1].flatten(), hi.flatten().half())


def test_attention_sink_untouched():
    x = _x(1, 2, 10, 16)
    x[:, :, 0] *= 100
    y = qdq_sequence(x, _nuq_value_spec())
    assert torch.equal(y[:, :, 0], x[:, :, 0].half().float())
    assert not torch.equal(y[:, :, 1:], x[:, :, 1:].half().float())


def _key_spec(H=2, D=16, bits=4):
    x = _x(200, H, D, seed=3).half().float()  # fp16-representable, as the cache's inputs
    from quantbench.methods.kvquant import KVQuantConfig, calibrate_keys

    return calibrate_keys(x, None, KVQuantConfig(bits=bits, outlier_frac=0.02, sink=1), False), x


def test_key_outliers_are_top_fraction_on_calibration_data():
    spec, x = _key_spec()
    xb = x.permute(1, 0, 2).unsqueeze(0)  # [1, H, N, D]
    e = encode(xb, spec)
    assert e.out_idx.numel() == 4 * 2 * 16  # 2% of 200 tokens = 2 above + 2 below per channel
    srt = x.sort(0).values  # per channel: thresholds are the 3rd smallest and 3rd largest values
    assert torch.equal(spec.lo.float(), srt[2].half().float()) and torch.equal(spec.hi.float(), srt[-3].half().float())


def test_key_thresholds_are_the_range_so_inliers_never_clip():
    """Eval-time keys (other data than calibration): every non-outlier normalizes into [-1, 1]."""
    spec, _ = _key_spec()
    x = (3 * _x(1, 2, 500, 16, seed=9)).half().float()  # wider than the calibration data
    mask = key_outlier_mask(x, spec)
    lo, hi = spec.lo[None, :, None, :].float(), spec.hi[None, :, None, :].float()
    xn = (x - (hi + lo) / 2) / ((hi - lo) / 2)
    assert xn[~mask].abs().max() <= 1 + 1e-6 and mask.any()
    y = decode(encode(x, spec), spec)
    assert torch.equal(y[mask], x[mask])
    c = spec.centroids  # inliers: the nearest centroid, rescaled (reference formula)
    ref = c[(xn.unsqueeze(-1) - c).abs().argmin(-1)] * (hi - lo) / 2 + (hi + lo) / 2
    torch.testing.assert_close(y[~mask], ref.expand_as(x)[~mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["kvquant", "kivi", "uniform", "fp16"])
def test_real_cache_equals_eval_path_and_calculator(kind):
    H, D, T = 2, 16, 70
    ks, _ = _key_spec(H, D)
    if kind == "kvquant":
        vs = _nuq_value_spec(bits=4, frac=1 / 16)
    elif kind == "kivi":
        ks = KVSpec("int", "channel", 2, 8, span_group=16)
        vs = KVSpec("int", "token", 2, 8, residual=16)
    elif kind == "uniform":
        ks = vs = KVSpec("int", "token", 2, 8)
    else:
        ks = vs = KVSpec()
    k, v = _x(1, H, T, D, seed=1), _x(1, H, T, D, seed=2)
    cache = QuantizedKVCache([(ks, vs)])
    for a, b in [(0, 33), (33, 34), (34, 50), (50, 70)]:  # prefill then steps of various lengths
        kk, vv = cache.update(k[:, :, a:b], v[:, :, a:b], 0)
    torch.testing.assert_close(kk, qdq_sequence(k, ks), atol=1e-6, rtol=0)
    torch.testing.assert_close(vv, qdq_sequence(v, vs), atol=1e-6, rtol=0)
    nb = kv_bytes(cache)
    name, prm = {
        "kvquant": ("kvquant", {"bits": 4, "outlier_frac": 1 / 16, "sink": 1}),
        "kivi": ("kivi", {"bits": 2, "group_size": 8, "residual_length": 16}),
        "uniform": ("kv-uniform", {"bits": 2, "group_size": 8}),
        "fp16": ("kv-fp16", {}),
    }[kind]
    kout = cache.layers[0].k_store.enc.out_idx.numel() if kind == "kvquant" else 0
    calc = kv_cache_bytes(name, prm, n_layers=1, n_kv_heads=H, head_dim=D, tokens=T, key_outliers=kout)
    for comp in ("codes", "scales", "outliers", "fp16"):
        assert nb[comp] == calc[comp], comp
    if kind == "kvquant":  # static: the calibrated key state (+ value centroids) once per layer
        assert nb["static"] == 2 * H * D * 2 + 16 * 2 + 16 * 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lookup_codes_equals_table_of_unpacked_codes(bits):
    c = torch.randint(0, 2**bits, (2, 3, 7, 64), generator=torch.Generator().manual_seed(bits))
    table = _x(2**bits, seed=bits)
    p = pack_codes(c, bits)
    assert torch.equal(lookup_codes(p, table, bits, 64), table[unpack_codes(p, bits, 64)])
    if bits != 3:
        lut = byte_lut(table, bits)
        assert lut.shape == (256, 8 // bits) and torch.equal(lut[0x1B, 0], table[0x1B & (2**bits - 1)])


def _concat_specs():
    ks, _ = _key_spec(H=2, D=32)
    return [ks, _nuq_value_spec(bits=3, frac=1 / 16), KVSpec("int", "token", 2, 8), KVSpec("int", "channel", 2, 4)]


@pytest.mark.parametrize("i", range(4))
def test_encoded_cat_equals_encoding_the_concatenation(i):
    """Chunks concatenated in one store decode exactly as the whole sequence encoded at once."""
    spec = _concat_specs()[i]
    x = _x(1, 2, 24, 32, seed=4)  # 3-bit codes pack 32 channels into whole int32 words
    parts = [(0, 8), (8, 12), (12, 24)]
    enc = encode(x[:, :, :8], spec)
    for a, b in parts[1:]:
        enc = enc.cat(encode(x[:, :, a:b], spec))
    whole = encode(x, spec)
    assert enc.shape == whole.shape and torch.equal(enc.codes, whole.codes)
    assert all(torch.equal(a, b) for a, b in zip(enc.scales, whole.scales, strict=True))
    if whole.out_idx is not None:
        assert torch.equal(enc.out_idx, whole.out_idx) and torch.equal(enc.out_val, whole.out_val)
    assert torch.equal(decode(enc, spec), decode(whole, spec))
    assert enc.nbytes() == whole.nbytes()


def test_decode_matches_reference_formula_with_outliers():
    spec = _nuq_value_spec(bits=4, frac=1 / 8)
    x = _x(2, 3, 5, 16, seed=6)
    e = encode(x, spec)
    B, H, n, D = x.shape
    codes = unpack_codes(e.codes, 4, D)
    lo, hi = (t.float() for t in e.scales)
    ref = spec.centroids[codes] * ((hi - lo) / 2) + (hi + lo) / 2
    for j, v in zip(e.out_idx.tolist(), e.out_val.tolist(), strict=True):  # token-major index
        t, r = divmod(j, B * H * D)
        b, r = divmod(r, H * D)
        h, d = divmod(r, D)
        ref[b, h, t, d] = v
    torch.testing.assert_close(decode(e, spec), ref, atol=1e-6, rtol=0)
    assert isinstance(e, Encoded) and e.out_idx.dtype == torch.int32


def test_rope_table_and_apply_rope_match_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from quantbench.harness.inputs.models import tiny_llama

    cfg = tiny_llama().model.config
    rot = LlamaRotaryEmbedding(cfg)
    D = cfg.hidden_size // cfg.num_attention_heads
    k = _x(1, 2, 50, D, seed=7)
    table = RopeTable(rot)
    for T in (7, 50, 13):  # grows, then slices
        cos, sin = table.get(T, k)
        c0, s0 = rot(k, torch.arange(T).unsqueeze(0))
        torch.testing.assert_close(cos, c0.unsqueeze(1), atol=0, rtol=0)
        torch.testing.assert_close(sin, s0.unsqueeze(1), atol=0, rtol=0)
        ref, _ = apply_rotary_pos_emb(k[:, :, :T], k[:, :, :T], c0, s0)
        torch.testing.assert_close(apply_rope(k[:, :, :T], cos, sin), ref, atol=1e-6, rtol=0)
    assert table.cos.shape[2] == 50


def test_cache_keeps_one_packed_store_and_no_float_copy():
    ks, _ = _key_spec(H=2, D=16)
    vs = _nuq_value_spec(bits=4, frac=1 / 16)
    cache = QuantizedKVCache([(ks, vs)])
    k, v = _x(1, 2, 40, 16, seed=1), _x(1, 2, 40, 16, seed=2)
    cache.update(k[:, :, :30], v[:, :, :30], 0)
    for t in range(30, 40):
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    for st in (cache.layers[0].k_store, cache.layers[0].v_store):
        assert st.enc.shape == (1, 2, 39, 16) and st.head.shape[2] == 1 and st.tail.shape[2] == 0
        assert st.enc.codes.dtype == torch.uint8 and st.enc.codes.shape == (1, 2, 39, 8)
        held = [t for t in vars(st).values() if isinstance(t, torch.Tensor)]
        assert all(t.dtype == torch.float16 and t.shape[2] <= 1 for t in held)  # only the sink


def test_kivi_window_quantizes_every_full_block_of_R_keys():
    """KIVI (Algorithm 1): keys quantize every full block of R tokens (T mod R newest in fp16), values
    keep exactly the R newest in fp16; decode steps fill the key window until it holds R tokens,
    which are then quantized as one block."""
    from quantbench.kernels.kvcache import quantized_span

    R, g = 128, 32
    ks = KVSpec("int", "channel", 2, g, span_group=R)
    vs = KVSpec("int", "token", 2, g, residual=R)
    assert quantized_span(1024, ks) == (0, 1024) and quantized_span(1024, vs) == (0, 1024 - R)
    assert quantized_span(1025, ks) == (0, 1024) and quantized_span(100, ks) == (0, 0)
    assert quantized_span(100, vs) == (0, 0) and quantized_span(129, vs) == (0, 1)
    H, D = 2, 64
    k, v = _x(1, H, 1024 + R, D, seed=11), _x(1, H, 1024 + R, D, seed=12)
    cache = QuantizedKVCache([(ks, vs)])
    cache.update(k[:, :, :1025], v[:, :, :1025], 0)
    kst, vst = cache.layers[0].k_store, cache.layers[0].v_store
    assert kst.n_quant == 1024 and kst.tail.shape[2] == 1  # one fp16 key after a 1025-token prefill
    assert vst.n_quant == 1025 - R and vst.tail.shape[2] == R
    for t in range(1025, 1024 + R - 1):  # the key window grows to R - 1 ...
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
        assert kst.n_quant == 1024 and kst.tail.shape[2] == t + 1 - 1024
        assert vst.n_quant == t + 1 - R and vst.tail.shape[2] == R
    kk, _ = cache.update(k[:, :, 1024 + R - 1 :], v[:, :, 1024 + R - 1 :], 0)  # ... and at R it is quantized
    assert kst.n_quant == 1024 + R and kst.tail.shape[2] == 0
    block = k[:, :, 1024 : 1024 + R]
    torch.testing.assert_close(kk[:, :, 1024:], decode(encode(block.half().float(), ks), ks), atol=0, rtol=0)
    torch.testing.assert_close(kk, qdq_sequence(k, ks), atol=1e-6, rtol=0)


def _rope_cs(T, D):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float()[None, None], ang.sin().float()[None, None]


def _packed_case(kind, bits, H=2, D=64):
    if kind == "kivi":
        return KVSpec("int", "channel", bits, 16, span_group=32), KVSpec("int", "token", bits, 16, residual=32)
    ks, _ = _key_spec(H, D, bits)
    vs = _nuq_value_spec(bits=bits, frac=1 / 16)
    ks.residual = vs.residual = 8  # a fp16 window after the packed span, besides the sink
    if bits == 2:  # Q-Norm's reconstruction table
        ks.qnorm, vs.qnorm = (1.1, 0.02), (0.9, -0.03)
    return ks, vs


@pytest.mark.parametrize("kind,bits", [("kivi", 2), ("kivi", 4), ("kvquant", 2), ("kvquant", 3), ("kvquant", 4)])
def test_packed_decode_attention_equals_dequantize_then_attend(kind, bits):
    """Attention on the packed store (scales folded into tables / softmax weights, outliers added
    separately, sink and fp16 window attended as is) == dequantize, rotate, attend (float64)."""
    from quantbench.kernels.kvcache import decode_attention_dense, fused_decode_attention, packed_decode_attention

    H, Hq, D, T = 2, 6, 64, 150
    ks, vs = _packed_case(kind, bits, H, D)
    k, v = 2 * _x(1, H, T, D, seed=21), _x(1, H, T, D, seed=22)
    k[..., 5] += 4  # an outlier channel
    cache = QuantizedKVCache([(ks, vs)])
    cache.update(k[:, :, :137], v[:, :, :137], 0)
    lay = cache.layers[0]
    rope = _rope_cs(T, D)
    for t in range(137, T):  # decode steps: the windows fill and get quantized
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
        q = _x(1, Hq, 1, D, seed=t)
        out = packed_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)
        ref = decode_attention_dense(q.double(), lay.k_store, lay.v_store, D**-0.5, rope)
        assert out.shape == (1, Hq, 1, D)
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 1e-4, (t, err.item())
        fused = fused_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)
        assert ((fused.double() - ref).norm() / ref.norm()).item() < 1e-4
    assert lay.k_store.n_quant > 0 and lay.v_store.n_quant > 0
    if kind == "kvquant":
        assert lay.k_store.enc.out_idx.numel() > 0 and lay.v_store.enc.out_idx.numel() > 0
        assert lay.k_store.head.shape[2] == 1 and lay.k_store.tail.shape[2] > 0
    # the reference itself is not trivially equal to the float attention (the test can fail)
    kf = apply_rope(k.double(), rope[0].double(), rope[1].double()).repeat_interleave(3, 1)
    dense = ((q.double() @ kf.transpose(-1, -2)) * D**-0.5).softmax(-1) @ v.double().repeat_interleave(3, 1)
    assert (dense - ref).norm() / ref.norm() > 1e-3



def _cpu_kernel():
    from quantbench.kernels.kvcache import load_cpu_decode_kernel

    if load_cpu_decode_kernel() is None:
        pytest.skip("the fused CPU decode kernel cannot be built here (no C++ compiler)")


@pytest.mark.parametrize(
    "kind,bits,B,D",
    [("kivi", 2, 1, 64), ("kivi", 4, 1, 128), ("kvquant", 2, 1, 64), ("kvquant", 3, 1, 64), ("kvquant", 4, 2, 64),
     ("kvquant", 4, 1, 32)],  # D = 32: the portable loops (the AVX-512 path serves D = 64 and 128)
)
def test_cpu_decode_attention_equals_dequantize_then_attend(kind, bits, B, D):
    """The fused C++ kernel (codes -> table -> scale -> outliers -> RoPE -> dot, softmax, values) ==
    dequantize, rotate, attend (float64), through sink, packed span (outliers) and fp16 window as the
    decode steps fill and quantize the window; with a mask it equals the torch packed path."""
    _cpu_kernel()
    from quantbench.kernels.kvcache import cpu_decode_attention, decode_attention_dense, packed_decode_attention

    H, Hq, T = 2, 6, 150
    ks, vs = _packed_case(kind, bits, H, D)
    k, v = 2 * _x(B, H, T, D, seed=21), _x(B, H, T, D, seed=22)
    k[..., 5] += 4  # an outlier channel
    cache = QuantizedKVCache([(ks, vs)])
    cache.update(k[:, :, :137], v[:, :, :137], 0)
    lay = cache.layers[0]
    rope = _rope_cs(T, D)
    for t in range(137, T):
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
        q = _x(B, Hq, 1, D, seed=t)
        out = cpu_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)
        ref = decode_attention_dense(q.double(), lay.k_store, lay.v_store, D**-0.5, rope)
        assert out.shape == (B, Hq, 1, D)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4, t
    assert lay.k_store.n_quant > 0 and lay.v_store.n_quant > 0
    if kind == "kvquant":
        assert lay.k_store.enc.out_idx.numel() > 0 and lay.v_store.enc.out_idx.numel() > 0
        assert lay.k_store.head.shape[2] == 1 and lay.k_store.tail.shape[2] > 0
    else:
        assert lay.k_store.tail.shape[2] > 0 and lay.v_store.tail.shape[2] > 0
    mask = torch.rand(B, 1, 1, T, generator=torch.Generator().manual_seed(1)) > 0.3
    out = cpu_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope, mask)
    ref = packed_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope, mask)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert ((out - cpu_decode_attention(q, lay.k_store, lay.v_store, D**-0.5, rope)).norm() / ref.norm()) > 1e-2
    no_rope = decode_attention_dense(q.double(), lay.k_store, lay.v_store, D**-0.5)  # rope=None: keys as stored
    out = cpu_decode_attention(q, lay.k_store, lay.v_store, D**-0.5)
    assert ((out.double() - no_rope).norm() / no_rope.norm()).item() < 1e-4

def test_packed_decode_in_the_model_equals_the_dequantize_path(monkeypatch):
    """Greedy decode of a tiny llama through the real kvquant cache: the packed attention path
    (generate_with_cache) gives the logits of the dequantize-then-SDPA path."""
    import copy

    from quantbench.harness.inputs.models import tiny_llama
    from quantbench.methods import kvquant as kq
    from quantbench.methods.base import Calibration, build_method
    from quantbench.methods.timing import greedy_decode

    torch.manual_seed(0)
    model = tiny_llama().model.eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(5))
    meth = build_method("kvquant", {"bits": 2, "outlier_frac": 0.02})
    model = meth.quantize(copy.deepcopy(model), Calibration(ids, "random", 5))
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    import quantbench.kernels.kvcache as kvc

    calls = []
    for name in ("packed_decode_attention", "cpu_decode_attention"):  # the torch path / the fused CPU kernel
        real = getattr(kvc, name)
        monkeypatch.setattr(kvc, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    c1 = meth.make_cache(model)
    out_packed = kq.generate_with_cache(model, prompt, 6, c1)
    assert len(calls) == 6 * len(c1.layers)  # every decode step of every layer attended on the packed store
    if kvc.load_cpu_decode_kernel() is not None:
        assert set(calls) == {"cpu_decode_attention"}  # on CPU, the fused kernel
    assert model.config._attn_implementation == "sdpa"  # restored
    c2 = meth.make_cache(model)
    kq.set_mode(model, "capture")
    try:
        out_ref = greedy_decode(model, prompt, 6, c2)
    finally:
        kq.set_mode(model, "qdq")
    assert torch.equal(out_packed, out_ref)
    with torch.no_grad():  # one more step each way: the logits agree to float rounding
        kq.set_mode(model, "capture")
        nxt = out_ref[:, -1:]
        ref_logits = model(nxt, past_key_values=c2, use_cache=True).logits
        model.config._attn_implementation = kq.register_packed_attention()
        c1.set_packed_decode(True)
        try:
            pk_logits = model(nxt, past_key_values=c1, use_cache=True).logits
        finally:
            c1.set_packed_decode(False)
            model.config._attn_implementation = "sdpa"
            kq.set_mode(model, "qdq")
    torch.testing.assert_close(pk_logits, ref_logits, atol=1e-4, rtol=1e-4)


def _same_encoding(a, b):
    assert a.shape == b.shape and a.codes.dtype == b.codes.dtype and torch.equal(a.codes, b.codes)
    assert len(a.scales) == len(b.scales) and all(torch.equal(x, y) for x, y in zip(a.scales, b.scales, strict=True))
    assert torch.equal(a.out_idx, b.out_idx) and torch.equal(a.out_val, b.out_val)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("B,n", [(1, 1), (2, 6)])
def test_encode_cpu_equals_encode_bit_for_bit(bits, B, n):
    """The C++ encoder the cache's appends use (kv_decode_cpu.cpp encode_nuq) gives encode()'s buffers exactly:
    keys (calibrated per-channel range, outliers outside it) and values (per-token top/bottom outliers, fp16
    range), on fp16-representable inputs as the cache feeds it; a tie at a value token's k-th largest entry
    (where topk's pick is torch's) falls back (None)."""
    _cpu_kernel()
    from quantbench.kernels.kvcache import encode_cpu

    H, D = 2, 64
    cal = (_x(200, H, D, seed=3) * 2).half().float()  # per-channel thresholds as KVQuant calibrates them (1%)
    lo, hi = cal.quantile(0.01, dim=0).half(), cal.quantile(0.99, dim=0).half()
    cents = torch.sort(torch.rand(2**bits, generator=torch.Generator().manual_seed(bits)) * 2 - 1).values
    ks = KVSpec("nuq", "channel", bits, outlier_frac=0.02, sink=1, centroids=cents, lo=lo, hi=hi)
    # distinct values (no ties among a token's entries): a random permutation of a fine fp16 grid
    g = torch.Generator().manual_seed(bits * 10 + n)
    grid = torch.arange(-(B * H * n * D) // 2, (B * H * n * D + 1) // 2, dtype=torch.float32) / 512
    x = grid[torch.randperm(grid.numel(), generator=g)].reshape(B, H, n, D)
    x[..., 3] += 6  # beyond the keys' calibrated range: key outliers
    for spec in (ks, _nuq_value_spec(bits, 1 / 64), _nuq_value_spec(bits, 0.1), _nuq_value_spec(bits, 0.0)):
        fast = encode_cpu(x, spec)
        assert fast is not None, spec
        _same_encoding(fast, encode(x, spec))
    assert encode_cpu(x, ks).out_idx.numel() > 0 and encode_cpu(x, _nuq_value_spec(bits, 0.1)).out_idx.numel() > 0
    tie = x.clone()
    tie[0, 1, 0, 7] = tie[0, 0, 0, 0] = tie.max() + 1  # two largest entries of token 0 equal: k = 1 is ambiguous
    assert encode_cpu(tie, _nuq_value_spec(bits, 1 / 64)) is None
    assert encode_cpu(x.to(torch.float64), KVSpec("int", "token", bits, 16)) is None  # int specs: encode()'s


def test_store_appends_in_place_and_equal_encoding_the_whole():
    """Decode-step appends write the new token into the store's buffers (capacity doubles, no copy of the store
    per token) and leave the same encoding as encode() of the whole span."""
    H, D, T = 2, 64, 40
    ks, _ = _key_spec(H, D, 4)
    vs = _nuq_value_spec(4, 1 / 16)
    x = (_x(1, H, T, D, seed=9) * 2).half().float()
    for spec in (ks, vs):
        cache = QuantizedKVCache([(spec, spec)])
        st = cache.layers[0].k_store
        st.append(x[:, :, :20])
        ptrs = set()
        for t in range(20, T):
            st.append(x[:, :, t : t + 1])
            ptrs.add(st.enc.codes.data_ptr())
        assert len(ptrs) == 2  # one reallocation (20 -> 38 tokens of capacity), then 39 -> 76
        _same_encoding(st.enc, encode(x[:, :, 1:], spec))  # the sink token stays fp16
        assert st.enc.codes.stride(2) * st.enc.codes.shape[2] < st.enc.codes.stride(1)  # a view of a larger buffer
        assert st.enc.nbytes() == encode(x[:, :, 1:], spec).nbytes()
