"""Triton decode attention over packed int4/int2 K/V vs the torch reference (interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels.kvcache import KVSpec, encode  # noqa: E402
from quantbench.kernels.triton_kv_attention import (  # noqa: E402
    HAS_TRITON,
    decode_attention_ref,
    decode_attention_triton,
    dequant_per_token,
)


def _packed(bits: int, B=1, H=2, T=100, D=32, G=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    spec = KVSpec("int", "token", bits, G)
    ek, ev = encode(k, spec), encode(v, spec)
    return k, v, ek, ev


@pytest.mark.parametrize("bits", [2, 4])
def test_reference_dequant_matches_encode_decode(bits):
    from quantbench.kernels.kvcache import decode

    k, _, ek, _ = _packed(bits)
    spec = KVSpec("int", "token", bits, 16)
    torch.testing.assert_close(dequant_per_token(ek.codes, *ek.scales, bits, 32), decode(ek, spec))


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("bits", [2, 4])
def test_triton_decode_matches_reference(bits):
    k, v, ek, ev = _packed(bits)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))  # GQA 4 query heads / 2 kv
    ref = decode_attention_ref(q, ek.codes, *ek.scales, ev.codes, *ev.scales, bits)
    out = decode_attention_triton(q, ek.codes, *ek.scales, ev.codes, *ev.scales, bits, block_t=32)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # and the quantized attention is close to fp attention (int4 much closer than int2)
    fp = torch.einsum(
        "bht,bhtd->bhd",
        (torch.einsum("bhd,bhtd->bht", q, k.repeat_interleave(2, 1)) / 32**0.5).softmax(-1),
        v.repeat_interleave(2, 1),
    )
    err = (out - fp).norm() / fp.norm()
    assert err < (0.1 if bits == 4 else 0.5)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("splits,T", [(1, 100), (3, 100), (7, 70), (64, 5)])
def test_triton_decode_split_t_matches_reference(splits, T):
    _, _, ek, ev = _packed(4, B=2, T=T)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    ref = decode_attention_ref(q, ek.codes, *ek.scales, ev.codes, *ev.scales, 4)
    out = decode_attention_triton(q, ek.codes, *ek.scales, ev.codes, *ev.scales, 4, block_t=16, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
