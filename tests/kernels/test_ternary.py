"""Ternary packing (2-bit, base-3, 1-bit), int8 activation quantization and CPU ternary matmuls vs the reference."""

import pytest
import torch

from quantbench.kernels import ternary as T


@pytest.mark.parametrize("fmt,n", [("2bit", 37), ("2bit", 64), ("base3", 41), ("base3", 65)])
def test_pack_unpack_roundtrip_ternary(fmt, n):
    codes = torch.randint(-1, 2, (7, n), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = T.pack_ternary(codes, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-n // T.CODES_PER_BYTE[fmt]))
    assert torch.equal(T.unpack_ternary(packed, n, fmt), codes)


def test_pack_unpack_roundtrip_1bit():
    codes = torch.randint(0, 2, (5, 29), dtype=torch.int8) * 2 - 1
    packed = T.pack_ternary(codes, "1bit")
    assert packed.shape == (5, 4)
    assert torch.equal(T.unpack_ternary(packed, 29, "1bit"), codes)


def test_exact_byte_layout():
    codes = torch.tensor([[-1, 0, 1, 1, 1, -1]], dtype=torch.int8)
    # 2-bit: c+1 = 0,1,2,2 -> 0 | 1<<2 | 2<<4 | 2<<6 = 0b10100100 = 164; then 2,0 + pad(1,1) -> 2 | 0 | 1<<4 | 1<<6 = 82
    assert T.pack_ternary(codes, "2bit").tolist() == [[164, 82]]
    # base-3: 0 + 1*3 + 2*9 + 2*27 + 2*81 = 237; then 0 (c=-1) -> 0 + pad 1*3 + 1*9 + 1*27 + 1*81 = 120
    assert T.pack_ternary(codes, "base3").tolist() == [[237, 120]]
    b = torch.tensor([[1, -1, -1, 1, 1, 1, -1, -1, 1]], dtype=torch.int8)
    assert T.pack_ternary(b, "1bit").tolist() == [[0b00111001, 0b11111111]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        T.pack_ternary(torch.tensor([[2, 0]]), "2bit")
    with pytest.raises(ValueError):
        T.pack_ternary(torch.tensor([[0, 1]]), "1bit")


def test_act_quant_int8_formula():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [2.0, 1.0, -0.004, 3.0]])
    xq, qb = T.act_quant_int8(x)
    assert torch.allclose(qb.view(-1), torch.tensor([127.0, 127.0 / 3]))
    assert xq.tolist() == [[64, -127, 32, 0], [85, 42, 0, 127]]  # round(63.5)=64 (half to even: 64)


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (7, 130, 33)])
def test_ternary_matmuls_exact(m, k, n):
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    ref = T.reference_ternary_matmul(xq, codes)
    assert torch.equal(T.int_mm_ternary(xq, codes.T.contiguous()).to(torch.int64), ref)
    pos, neg = T.addsub_index(codes)
    assert torch.equal(T.addsub_ternary(xq, pos, neg).to(torch.int64), ref)
    deq = T.dequant_bf16_matmul(xq.float(), codes, torch.ones(1))
    torch.testing.assert_close(deq.float(), ref.float(), rtol=1e-2, atol=1.0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_linear_matches_fp_reference(per_channel):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-1, 2, (48, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(48 if per_channel else 1, generator=g) + 0.1
    x = torch.randn(3, 5, 64, generator=g)
    bias = torch.randn(48, generator=g)
    y = T.ternary_linear(x, codes.T.contiguous(), scale, bias)
    xq, qb = T.act_quant_int8(x)
    ref = (xq.double() @ codes.double().T) / qb.double() * scale.double() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    yw = T.ternary_linear(x, codes.T.contiguous(), scale, None, act_bits=None)
    torch.testing.assert_close(yw.double(), x.double() @ (codes.double().T * scale.double()), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the 2-bit packed CPU kernel

needs_kernel = pytest.mark.skipif(not T.load_ternary_cpu_kernel(), reason="no C++ compiler for kernels/ternary_cpu.cpp")


@needs_kernel
@pytest.mark.parametrize("k,n", [(576, 1536), (1536, 576), (64, 48), (130, 33), (7, 5), (257, 70), (1, 3)])
def test_packed_2bit_kernel_is_exact(k, n):
    """Against the integer reference on every row count it serves (and more), with K not a multiple of 4 or 64
    (masked tails, padded codes) and the extreme activations -128 / 127 on every code."""
    g = torch.Generator().manual_seed(k * 1000 + n)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    packed = T.pack_ternary(codes, "2bit")
    for m in (1, 2, 3, 4, 6):
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        xq[0] = -128
        if m > 1:
            xq[1] = 127
        assert torch.equal(T.ternary_mm_2bit(xq, packed).to(torch.int64), T.reference_ternary_matmul(xq, codes))
    with pytest.raises(RuntimeError, match="activations for rows of"):
        T.ternary_mm_2bit(torch.zeros(1, k + 4, dtype=torch.int8), packed)


@needs_kernel
@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_linear_decode_reads_the_packed_codes_bit_for_bit(per_channel, monkeypatch):
    """TernaryLinear at M <= PACKED_GEMV_MAX_ROWS takes the 2-bit kernel (not the int8 copy of the codes), with
    outputs equal bit for bit to the int_mm path; longer inputs, and a missing kernel, take int_mm."""
    from quantbench.methods.bitnet import TernaryLinear

    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-1, 2, (96, 200), generator=g, dtype=torch.int8)
    scale = torch.rand(96 if per_channel else 1, generator=g) + 0.1
    m = TernaryLinear.from_codes(codes, scale, "2bit", "channel" if per_channel else "tensor",
                                 bias=torch.randn(96, generator=g))
    m.cache_codes = False
    calls = []
    real = T.ternary_mm_2bit
    monkeypatch.setattr(T, "ternary_mm_2bit", lambda *a: calls.append(1) or real(*a))
    for shape in [(1, 1, 200), (2, 2, 200), (1, 200)]:
        x = torch.randn(*shape, generator=g)
        want = T.ternary_linear(x, codes.T.contiguous(), m.scale.view(-1), m.bias)
        calls.clear()
        assert torch.equal(m(x), want) and calls
    x = torch.randn(1, 5, 200, generator=g)
    calls.clear()
    assert torch.equal(m(x), T.ternary_linear(x, codes.T.contiguous(), m.scale.view(-1), m.bias)) and not calls
    monkeypatch.setattr(T, "loaded_cpp_ops", lambda source: None)
    x = torch.randn(1, 1, 200, generator=g)
    assert torch.equal(m(x), T.ternary_linear(x, codes.T.contiguous(), m.scale.view(-1), m.bias)) and not calls


@needs_kernel
def test_ternary_decode_kernel_compiles_in_one_graph():
    """torch.compile(fullgraph=True) traces the operator through its registered shape function."""
    from quantbench.methods.bitnet import TernaryLinear

    g = torch.Generator().manual_seed(3)
    m = TernaryLinear.from_codes(torch.randint(-1, 2, (40, 72), generator=g, dtype=torch.int8), torch.tensor([0.7]))
    x = torch.randn(1, 1, 72, generator=g)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))


@needs_kernel
def test_the_kernel_builds_from_a_copy_in_torchs_build_folder():
    """Every checkout of the same source compiles the same path (ninja rebuilds when a source path changes)."""
    from pathlib import Path

    from torch.utils import cpp_extension

    mod = T.loaded_cpp_ops("ternary_cpu.cpp")
    copy = Path(cpp_extension._get_build_directory(mod.name, False)) / "ternary_cpu.cpp"
    assert copy.read_bytes() == (Path(T.__file__).parent / "ternary_cpu.cpp").read_bytes()
    assert str(copy) in (copy.parent / "build.ninja").read_text()
