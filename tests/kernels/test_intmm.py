"""Packed int matmul: pack/unpack round trips, CPU int4 fast path vs the pure-torch reference."""

import pytest
import torch

from quantbench.kernels import intmm
from quantbench.kernels.intq import pack_bits, unpack_bits
from quantbench.methods.gptq_solver import gptq_quantize
from quantbench.methods.qlinear import IntQuantLinear, unpack_rows


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_exact(bits):
    codes = torch.randint(0, 2**bits, (128, 96), dtype=torch.int32)
    packed = pack_bits(codes, bits, 0)
    assert packed.shape == (128 * bits // 32, 96)
    assert torch.equal(unpack_rows(packed, bits, 128), codes)
    assert torch.equal(unpack_bits(pack_bits(codes, bits, 1), bits, 96, 1), codes)


def make_layer(in_f, out_f, bits, gs, act_order, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(in_f, 512, generator=g) * torch.rand(in_f, 1, generator=g).mul(3)
    r = gptq_quantize(W, 2 * X @ X.T / 512, bits, gs, act_order=act_order)
    b = torch.randn(out_f, generator=g) if bias else None
    return IntQuantLinear.from_codes(r.codes, r.scales, r.zeros, bits, gs, g_idx=r.g_idx, bias=b), r


@pytest.mark.parametrize(
    "in_f,out_f,gs,act_order,op_group",
    [(256, 64, 128, False, 128), (576, 192, 128, True, 64), (576, 64, -1, True, 64), (1536, 32, 32, True, 32)],
)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_int4pack_fast_path_matches_reference(in_f, out_f, gs, act_order, op_group, m, bits):
    layer, r = make_layer(in_f, out_f, bits, gs, act_order)
    assert torch.equal(layer.dequantized_weight(), r.Q)
    x = torch.randn(2, m, in_f)
    ref = intmm.reference_linear(x, layer)
    fast = intmm.int4pack_linear(x, layer)
    cache = intmm.int4pack_cache(layer)
    assert cache.group == op_group and (cache.perm is not None) == (act_order and gs != -1)
    assert fast.shape == ref.shape and fast.dtype == x.dtype
    assert sqnr_db(ref, fast) > 45  # bf16 activations and scales: ~50 dB
    # the module's packed forward takes the fast path
    assert torch.equal(layer(x), fast)


def test_fast_path_cache_follows_buffer_changes():
    layer, _ = make_layer(256, 64, 4, 64, False)
    x = torch.randn(3, 256)
    intmm.int4pack_linear(x, layer)
    layer.scales.mul_(2)  # in-place change bumps the buffer version: the cache is rebuilt
    assert sqnr_db(intmm.reference_linear(x, layer), layer(x)) > 45


@pytest.mark.parametrize("bits,out_f", [(4, 40), (8, 64)])
def test_unsupported_shapes_use_reference(bits, out_f):
    layer, _ = make_layer(128, out_f, bits, 32, True)
    assert intmm.int4pack_cache(layer) is None
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), intmm.reference_linear(x, layer))


def test_scattered_groups_use_reference():
    layer, _ = make_layer(128, 64, 4, 32, False)
    layer.g_idx.copy_(torch.randint(0, 4, (128,), dtype=torch.int32))  # no permutation makes groups contiguous
    layer.g_idx[:32] = 0  # group 0 larger than 32 columns
    assert intmm.int4pack_cache(layer) is None
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), intmm.reference_linear(x, layer))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 17])
def test_int8pack_fast_path_matches_reference(sym, act_order, m):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 576, generator=g) + 0.3  # an offset so asymmetric zeros sit away from 128
    X = torch.randn(576, 512, generator=g) * torch.rand(576, 1, generator=g).mul(3)
    r = gptq_quantize(W, 2 * X @ X.T / 512, 8, -1, act_order=act_order, sym=sym)
    layer = IntQuantLinear.from_codes(r.codes, r.scales, r.zeros, 8, -1, g_idx=r.g_idx, bias=torch.randn(96))
    assert sym or (layer.zeros() != 128).any()
    x = torch.randn(2, m, 576)
    ref = intmm.reference_linear(x, layer)
    fast = intmm.int8pack_linear(x, layer)
    assert fast.shape == ref.shape and fast.dtype == x.dtype
    assert sqnr_db(ref, fast) > 45  # bf16 activations and scales
    assert torch.equal(layer(x), fast)  # the module's packed forward takes the fast path
    # the runtime copy is one byte per weight, as stored
    assert intmm.int8pack_cache(layer).codes.dtype == torch.int8


def test_grouped_int8_uses_reference():
    layer, _ = make_layer(128, 64, 8, 32, False)
    assert intmm.int8pack_cache(layer) is None
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), intmm.reference_linear(x, layer))
