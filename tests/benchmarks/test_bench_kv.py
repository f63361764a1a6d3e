"""Decode attention at long context: fp16 K/V vs packed int4 (torch dequant path), CPU."""

import math

import pytest
import torch

from quantbench.kernels.kvcache import KVSpec, decode_attention_ref, encode

B, HQ, HKV, T, D = 1, 8, 2, 8192, 64


@pytest.fixture(scope="module")
def kv():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    q = torch.randn(B, HQ, D, generator=g)
    spec = KVSpec("int", "token", 4, 32)
    return q, k.half(), v.half(), encode(k, spec), encode(v, spec)


def _fp_attention(q, k, v):
    k, v = k.float().repeat_interleave(HQ // HKV, 1), v.float().repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("bhd,bhtd->bht", q, k) / math.sqrt(D)
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v)


def test_bench_decode_fp16(benchmark, kv):
    q, k, v, _, _ = kv
    out = benchmark(_fp_attention, q, k, v)
    assert out.shape == (B, HQ, D)


def test_bench_decode_int4_packed(benchmark, kv):
    q, k, v, ek, ev = kv
    out = benchmark(decode_attention_ref, q, ek.codes, *ek.scales, ev.codes, *ev.scales, 4)
    err = (out - _fp_attention(q, k, v)).norm() / _fp_attention(q, k, v).norm()
    assert err < 0.2  # near-uniform attention over 8k random tokens: output norm is small
    assert ek.codes.numel() * ek.codes.element_size() == k.numel() // 2  # 4 bits per element


@pytest.fixture(scope="module")
def kivi_store():
    from quantbench.kernels.kvcache import QuantizedKVCache

    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    ks, vs = KVSpec("int", "channel", 2, 32, span_group=128), KVSpec("int", "token", 2, 32, residual=128)
    cache = QuantizedKVCache([(ks, vs)])
    cache.update(k, v, 0)
    return cache.layers[0], torch.randn(B, HQ, 1, D, generator=g)


def test_bench_decode_kivi2_packed_attention(benchmark, kivi_store):
    """Decode attention on the packed KIVI-2 store (no dequantized K/V copy), checked against
    dequantize-then-attend."""
    from quantbench.kernels.kvcache import decode_attention_dense, packed_decode_attention

    layer, q = kivi_store
    out = benchmark(packed_decode_attention, q, layer.k_store, layer.v_store, D**-0.5)
    ref = decode_attention_dense(q.double(), layer.k_store, layer.v_store, D**-0.5)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4
