"""KV quantization primitives: reference formulas, packing, NUQ k-means, dense-and-sparse, sink, cache."""

import pytest
import torch

from quantbench.harness.kvcalc import kv_cache_bytes
from quantbench.kernels.kvcache import (
    KVSpec,
    QuantizedKVCache,
    decode,
    encode,
    kv_bytes,
    pack_codes,
    q_norm,
    qdq_sequence,
    topk_outlier_mask,
    unpack_codes,
    weighted_kmeans_1d,
)


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
    x = (centers.repeat_interleave(500) + 0.01 * torch.randn(2000, generator=g))
    c = weighted_kmeans_1d(x, None, 4)
    assert (c - centers).abs().max() < 0.01
    # weights pull the centroid: two points, weight 9:1 -> centroid at the weighted mean
    c1 = weighted_kmeans_1d(torch.tensor([0.0, 1.0]), torch.tensor([9.0, 1.0]), 1)
    assert abs(c1.item() - 0.1) < 1e-5


def test_q_norm_matches_mean_and_std():
    x = _x(5000).clamp(-1, 1)
    c = weighted_kmeans_1d(x, None, 4)
    cn = q_norm(c, x)
    from quantbench.kernels.kvcache import nearest_centroid

    xq = cn[nearest_centroid(x, cn)]
    assert abs(xq.mean() - x.mean()) < 0.02 and abs(xq.std() - x.std()) < 0.02


def _nuq_value_spec(bits=2, frac=0.1):
    return KVSpec("nuq", "token", bits, outlier_frac=frac, sink=1,
                  centroids=torch.linspace(-1, 1, 2**bits))


def test_dense_and_sparse_keeps_exactly_top_fraction():
    x = _x(1, 2, 9, 40)
    spec = _nuq_value_spec(frac=0.1)  # 4 of 40 per token
    e = encode(x, spec)
    assert e.out_idx.numel() == 2 * 9 * 4
    mask = topk_outlier_mask(x, 0.1)
    assert torch.equal(e.out_idx.long(), mask.flatten().nonzero().flatten())
    y = decode(e, spec)
    assert torch.equal(y[mask], x[mask].half().float())  # outliers exact in fp16
    # inliers lie in the per-token inlier range, outliers are the largest magnitudes
    thr = x.abs().masked_fill(mask, 0).amax(-1, keepdim=True)
    assert (x.abs()[mask].view(1, 2, 9, 4) >= thr).all()


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
    assert e.out_idx.numel() == 4 * 2 * 16  # 2% of 200 tokens = 4 per channel


@pytest.mark.parametrize("kind", ["kvquant", "kivi", "uniform", "fp16"])
def test_real_cache_equals_eval_path_and_calculator(kind):
    H, D, T = 2, 16, 70
    ks, _ = _key_spec(H, D)
    if kind == "kvquant":
        vs = _nuq_value_spec(bits=4, frac=1 / 16)
    elif kind == "kivi":
        ks = KVSpec("int", "channel", 2, 16, residual=8)
        vs = KVSpec("int", "token", 2, 16, residual=8, span_group=16)
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
    name, prm = {"kvquant": ("kvquant", {"bits": 4, "outlier_frac": 1 / 16, "sink": 1}),
                 "kivi": ("kivi", {"bits": 2, "group_size": 16, "residual_length": 8}),
                 "uniform": ("kv-uniform", {"bits": 2, "group_size": 8}),
                 "fp16": ("kv-fp16", {})}[kind]
    kout = sum(0 if c.out_idx is None else c.out_idx.numel() for c in cache.layers[0].k_store.chunks)
    calc = kv_cache_bytes(name, prm, n_layers=1, n_kv_heads=H, head_dim=D, tokens=T, key_outliers=kout)
    for comp in ("codes", "scales", "outliers", "fp16"):
        assert nb[comp] == calc[comp], comp
    if kind == "kvquant":  # static: the calibrated key state (+ value centroids) once per layer
        assert nb["static"] == 3 * H * D * 2 + 16 * 2 + 16 * 2
