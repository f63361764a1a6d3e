"""FP4 formats: E2M1 codes and rounding, nibble layout, MXFP4 (E8M0) and NVFP4 (E4M3 + fp32) scales, exact values."""

import math

import pytest
import torch

from quantbench.kernels import fp4


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


# --------------------------------------------------------------------------- E2M1


def test_every_code_decodes_by_the_spec_fields_and_encodes_back():
    codes = torch.arange(16, dtype=torch.uint8)
    values = fp4.decode_e2m1(codes)
    for c in range(16):
        sign, exp, man = c >> 3, (c >> 1) & 3, c & 1
        mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)  # bias 1, exponent 0 subnormal
        assert values[c].item() == (-mag if sign else mag)
        assert math.copysign(1.0, values[c].item()) == (-1.0 if sign else 1.0)  # code 8 is -0
    assert values[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(fp4.encode_e2m1(values), codes)


@pytest.mark.parametrize("x,expected", [
    (0.25, 0.0), (0.2501, 0.5), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0),  # ties go to the even mantissa
    (2.5, 2.0), (2.6, 3.0), (3.5, 4.0), (5.0, 4.0), (5.01, 6.0), (4.9, 4.0),
    (6.0, 6.0), (7.0, 6.0), (1e30, 6.0),  # saturation
    (-2.5, -2.0), (-5.0, -4.0), (-7.0, -6.0), (-0.6, -0.5), (0.1, 0.0),
])
def test_rounding_of_hand_values(x, expected):
    assert fp4.decode_e2m1(fp4.encode_e2m1(torch.tensor([x]))).item() == expected


def test_small_negatives_keep_their_sign_as_minus_zero():
    assert fp4.encode_e2m1(torch.tensor([-0.1, -0.0, 0.0])).tolist() == [8, 8, 0]


def test_rounding_is_to_the_nearest_grid_value():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    got = fp4.decode_e2m1(fp4.encode_e2m1(x))
    grid = torch.tensor(fp4.E2M1_VALUES + tuple(-v for v in fp4.E2M1_VALUES[1:]))
    nearest_err = (x.clamp(-6, 6).unsqueeze(1) - grid).abs().min(1).values
    assert torch.equal((x.clamp(-6, 6) - got).abs(), nearest_err)


def test_nibble_layout_first_element_in_the_low_nibble():
    codes = torch.tensor([[0x1, 0x2, 0x3, 0xF], [0xA, 0x0, 0x7, 0x8]], dtype=torch.uint8)
    packed = fp4.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0xF3], [0x0A, 0x87]]
    assert torch.equal(fp4.unpack_nibbles(packed), codes)
    with pytest.raises(ValueError, match="must be even"):
        fp4.pack_nibbles(torch.zeros(3, dtype=torch.uint8))


# --------------------------------------------------------------------------- MXFP4


@pytest.mark.parametrize("amax,code", [
    (5.0, 127), (4.0, 127), (6.0, 127), (7.99, 127), (8.0, 128),  # amax in [4, 8) -> 2^0
    (0.75, 124),  # floor(log2 0.75) = -1 -> 2^-3: 0.75 maps to 6
    (1.0, 125), (0.5, 124), (448.0, 133),
    (0.0, 0),  # an all-zero block: the smallest scale
    (2.0 ** -130, 0),  # below 2^-125: clamped to 2^-127
    (torch.finfo(torch.float32).max, 252),  # floor(log2) = 127 -> 2^125
])
def test_mx_scale_exponent_of_hand_blocks(amax, code):
    e = fp4.mx_scale_exponent(torch.tensor([amax]))
    assert e.dtype == torch.uint8 and e.item() == code
    if code:
        scale = fp4.e8m0_to_float(e).item()
        assert scale == 2.0 ** (code - 127)
        if 2 ** -125 <= amax:
            assert 4 <= amax / scale < 8


def test_e8m0_codes_are_exact_powers_of_two():
    codes = torch.arange(255, dtype=torch.uint8)
    assert fp4.e8m0_to_float(codes).tolist() == [2.0 ** (c - 127) for c in range(255)]


def test_mx_dequantized_values_of_hand_blocks():
    b0 = torch.zeros(32)
    b0[:9] = torch.tensor([5.0, -2.5, 2.6, 0.2, 0.3, 1.3, -1.7, 3.5, 5.0])  # amax 5: scale 2^0 (-1.7 < 1.75: -1.5)
    b1 = torch.zeros(32)
    b1[:4] = torch.tensor([0.75, 0.3, -0.1, 0.03125])  # amax 0.75: scale 2^-3 -> 6, 2.4, -0.8, 0.25
    q = fp4.quantize_mx(torch.cat([b0, b1]).unsqueeze(0))
    assert q.codes.shape == (1, 32) and q.codes.dtype == torch.uint8
    assert q.exponents.tolist() == [[127, 124]]
    out = fp4.dequantize_mx(*q)[0]
    assert out[:9].tolist() == [4.0, -2.0, 3.0, 0.0, 0.5, 1.5, -1.5, 4.0, 4.0]
    assert out[32:36].tolist() == [0.75, 0.25, -0.125, 0.0]
    assert (out[9:32] == 0).all() and (out[36:] == 0).all()
    # the first byte: element 0 (4.0 -> code 6) low, element 1 (-2.0 -> code 12) high
    assert q.codes[0, 0].item() == 6 | (12 << 4)


def test_mx_quantization_is_idempotent_and_shapes_follow_the_blocks():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    q = fp4.quantize_mx(x)
    assert q.codes.shape == (3, 5, 32) and q.exponents.shape == (3, 5, 2)
    xq = fp4.dequantize_mx(*q)
    assert torch.equal(fp4.fake_quantize_mx(xq), xq)


# --------------------------------------------------------------------------- NVFP4


def test_nv_scales_follow_the_two_level_formula():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.02
    q = fp4.quantize_nv(x)
    amax = x.abs().amax()
    assert q.global_scale.dtype == torch.float32 and q.global_scale.item() == (amax / (448 * 6)).item()
    assert q.block_scales.dtype == torch.float8_e4m3fn and q.block_scales.shape == (64, 8)
    expected = (x.reshape(64, 8, 16).abs().amax(-1) / 6 / q.global_scale).clamp(max=448).to(torch.float8_e4m3fn)
    assert torch.equal(q.block_scales.float(), expected.float())
    assert q.block_scales.float().max().item() == 448.0  # the block holding the tensor's amax
    s = q.block_scales.float().unsqueeze(-1) * q.global_scale
    assert torch.equal(fp4.dequantize_nv(*q), (fp4.decode_e2m1(fp4.unpack_nibbles(q.codes)).reshape(64, 8, 16) * s)
                       .reshape(64, 128))


def test_nv_dequantized_values_of_a_hand_tensor():
    x = torch.zeros(32)
    x[:3] = torch.tensor([5.25, 1.0, -2.2])  # tensor amax 5.25: global 5.25 / 2688 = 2^-9
    x[16:18] = torch.tensor([0.3, 0.1])  # block scale 0.3 / 6 * 512 = 25.6 -> e4m3 26
    q = fp4.quantize_nv(x)
    assert q.global_scale.item() == 2.0 ** -9
    assert q.block_scales.float().tolist() == [448.0, 26.0]
    out = fp4.dequantize_nv(*q)
    s0, s1 = 448 * 2.0 ** -9, 26 * 2.0 ** -9  # 0.875, 0.05078125
    assert out[:3].tolist() == [6 * s0, 1 * s0, -3 * s0]  # 6, 1.14 -> 1, -2.51 -> -3
    assert out[16:18].tolist() == [6 * s1, 2 * s1]  # 5.91 -> 6, 1.97 -> 2
    assert (out[3:16] == 0).all() and (out[18:] == 0).all()


def test_nv_keeps_subnormal_e4m3_block_scales():
    x = torch.zeros(32)
    x[0] = 2688.0  # global scale 1
    x[16:18] = torch.tensor([6 * 2.0 ** -8, 2.0 ** -8])  # block scale 2^-8 = 2 * 2^-9: an E4M3 subnormal
    q = fp4.quantize_nv(x)
    assert q.global_scale.item() == 1.0 and q.block_scales.float().tolist() == [448.0, 2.0 ** -8]
    assert fp4.dequantize_nv(*q)[16:18].tolist() == [6 * 2.0 ** -8, 2.0 ** -8]


def test_nv_per_row_global_scale_quantizes_each_row_alone():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * torch.tensor([[1.0], [10.0], [0.01], [3.0]])
    gs = fp4.nv_global_scale(x.abs().amax(-1, keepdim=True))
    q = fp4.quantize_nv(x, gs)
    assert q.global_scale.shape == (4, 1)
    out = fp4.dequantize_nv(*q)
    for i in range(4):
        assert torch.equal(out[i], fp4.fake_quantize_nv(x[i]))


@pytest.mark.parametrize("fmt", ["mx", "nv"])
def test_zeros_and_bad_inputs(fmt):
    quant, fake, block = ((fp4.quantize_mx, fp4.fake_quantize_mx, 32) if fmt == "mx"
                          else (fp4.quantize_nv, fp4.fake_quantize_nv, 16))
    z = torch.zeros(2, 64)
    assert torch.equal(fake(z), z)
    with pytest.raises(ValueError, match=f"multiple of {block}"):
        quant(torch.zeros(2, 40))
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 64)
        x[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or an infinity"):
            quant(x)


def test_sqnr_on_gaussian_weights_nvfp4_above_mxfp4():
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    mx, nv = _sqnr_db(w, fp4.fake_quantize_mx(w)), _sqnr_db(w, fp4.fake_quantize_nv(w))
    print(f"Gaussian 1536x576 SQNR: mxfp4 {mx:.2f} dB, nvfp4 {nv:.2f} dB")
    assert 18.0 < mx < nv and nv > 20.0


def test_bf16_input_gives_the_same_codes_as_its_float32_value():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert torch.equal(fp4.quantize_mx(x).codes, fp4.quantize_mx(x.float()).codes)
    assert fp4.fake_quantize_nv(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- optional: torchao's references


def test_matches_torchao_mx_and_nvfp4_references():
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    g = torch.Generator().manual_seed(5)
    # rows of different magnitudes, every NVFP4 block scale a normal E4M3 value: torchao clamps block scales
    # to E4M3's smallest normal 2^-6, where the reference keeps the subnormal value the cast gives
    w = torch.randn(256, 512, generator=g) * (0.25 + torch.rand(256, 1, generator=g)) * 3
    scale, data = mx_tensor.to_mx(w, torch.float4_e2m1fn_x2, 32)  # OCP "floor" scale, low nibble first
    q = fp4.quantize_mx(w)
    assert torch.equal(scale.view(torch.uint8), q.exponents)
    assert torch.equal(data.view(torch.uint8), q.codes)
    gs = nvfp4_tensor.per_tensor_amax_to_scale(w.abs().amax())
    block, data = nvfp4_tensor.nvfp4_quantize(w, 16, gs)
    n = fp4.quantize_nv(w)
    assert torch.equal(gs, n.global_scale)
    assert torch.equal(block.view(torch.uint8), n.block_scales.view(torch.uint8))
    # torchao multiplies by a reciprocal where the reference divides: an exact tie may round the other way
    assert (data.view(torch.uint8) == n.codes).float().mean() > 0.999


def test_packed_decode_by_byte_table_equals_elementwise_decode():
    """The byte-table decode the dequantizers use == decode_e2m1(unpack_nibbles(.)) bit for bit (-0.0 too)."""
    every = torch.arange(256, dtype=torch.uint8)
    ref = fp4.decode_e2m1(fp4.unpack_nibbles(every))
    got = fp4.decode_packed_e2m1(every)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bitwise: -0.0 (code 8) is not +0.0
    assert torch.signbit(got[16]) and not torch.signbit(got[17])  # byte 0x08: low nibble -0.0, then +0.0
    packed = torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fp4.decode_packed_e2m1(packed), fp4.decode_e2m1(fp4.unpack_nibbles(packed)))
    assert fp4.decode_packed_e2m1(packed).shape == (3, 5, 32)
