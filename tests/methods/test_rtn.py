"""RTN: the per-element error bound, packing round trips, storage accounting."""

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.kernels.intq import grid_params, pack_bits, unpack_bits
from quantbench.methods.base import build_method, model_storage
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.rtn import rtn_quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, 96, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_bounded_by_half_scale(bits, group_size, sym):
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3
    codes, scales, zeros = rtn_quantize_weight(w, bits, group_size, sym)
    q = IntQuantLinear.from_codes(codes, scales, zeros, bits, group_size, sym=sym)
    w_hat = q.dequantized_weight()
    s = q.scales.float()[q.g_idx.long()].t()  # [out, in]: the fp16 scale actually stored (96: a short last group)
    assert (codes >= 0).all() and (codes <= 2**bits - 1).all()
    assert ((w - w_hat).abs() <= s / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (64, 96), dtype=torch.int32)
    for dim in (0, 1):
        packed = pack_bits(codes, bits, dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] == codes.shape[dim] * bits // 32
        assert torch.equal(unpack_bits(packed, bits, codes.shape[dim], dim), codes)


def test_pack_layout_is_gptq_bitstream():
    # 4 bits: value i of a column sits at bits 4*(i % 8) of word i // 8
    codes = torch.arange(16, dtype=torch.int32).view(16, 1) % 16
    packed = pack_bits(codes, 4, 0)
    assert packed[0, 0].item() == 0x76543210
    assert packed[1, 0].item() == int.from_bytes(bytes.fromhex("fedcba98"), "big") - 2**32
    # 3 bits: 32 values in 3 words; value 10 straddles words 0 and 1 (2 low bits in word 0)
    c3 = torch.zeros(32, 1, dtype=torch.int32)
    c3[10] = 0b111
    p3 = pack_bits(c3, 3, 0)
    assert (p3[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30 and p3[1, 0].item() == 0b1 and p3[2, 0].item() == 0


def test_grid_asym_and_sym():
    wmin, wmax = torch.tensor([-1.0, 0.5]), torch.tensor([3.0, 2.0])
    scale, zero = grid_params(wmin, wmax, 4, sym=False)
    assert torch.allclose(scale, torch.tensor([4 / 15, 2 / 15]))  # min clipped to 0 for the second row
    assert torch.equal(zero, torch.tensor([4.0, 0.0]))  # round(1 / (4/15)) = round(3.75)
    scale, zero = grid_params(wmin, wmax, 4, sym=True)
    assert torch.allclose(scale, torch.tensor([6 / 15, 4 / 15])) and torch.equal(zero, torch.tensor([8.0, 8.0]))


def test_rtn_model_storage_and_bits_per_weight():
    lm = tiny_llama()
    m = build_method("rtn", {"bits": 4, "group_size": 128}).quantize(lm.model, None)
    lin = model_storage(m)["linear"]
    n = lin.quantized_weights
    assert lin.packed_weights == n // 2  # 4 bits per weight, no padding
    assert lin.scales_zeros == (n // 128) * (2 + 0.5)  # fp16 scale + a packed 4-bit zero per group
    assert 8 * lin.total / n == pytest.approx(4 + 20 / 128)


@pytest.mark.parametrize("fast", [False, True])
def test_packed_and_simulated_paths_agree(fast, monkeypatch):
    from quantbench.kernels import intmm

    monkeypatch.setattr(intmm, "CPU_FAST_PATH", fast)  # reference unpack vs the int4pack op (bf16)
    lm = tiny_llama()
    m = build_method("rtn", {"bits": 3, "group_size": 64}).quantize(lm.model, None)
    x = torch.randint(0, 256, (1, 32))
    a = m(x).logits
    for mod in m.modules():
        if isinstance(mod, IntQuantLinear):
            mod.packed = False
    b = m(x).logits
    if fast:  # bf16 activations: ~2^-9 relative per layer
        assert 10 * torch.log10(b.pow(2).sum() / (a - b).pow(2).sum()) > 35
    else:
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_row_unpack_equals_bitstream_unpack(bits):
    from quantbench.kernels.intq import unpack_rows

    codes = torch.randint(0, 2**bits, (96, 40), dtype=torch.int32)
    packed = pack_bits(codes, bits, 0)
    assert torch.equal(unpack_rows(packed, bits, 96), codes)
