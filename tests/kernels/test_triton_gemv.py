"""Triton GEMV (M = 1) and the dequantize-for-prefill kernels vs float64 references, under the interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels import ternary as T  # noqa: E402
from quantbench.methods.qlinear import IntQuantLinear  # noqa: E402
from quantbench.methods.rtn import rtn_quantize_weight  # noqa: E402

triton_gemv = pytest.importorskip("quantbench.kernels.triton_gemv")
from quantbench.kernels import triton_ternary, triton_w4a16  # noqa: E402

pytestmark = pytest.mark.triton


def _layer(K, N, bits, gs, act_order, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    codes, scales, zeros = rtn_quantize_weight(w, bits, gs, False)
    g_idx = torch.arange(K) // (gs if gs > 0 else K)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    b = torch.randn(N, generator=g) if bias else None
    return IntQuantLinear.from_codes(codes, scales, zeros, bits, gs if gs > 0 else K, g_idx=g_idx, bias=b)


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits,gs,act_order", [(4, 128, False), (4, 64, True), (2, 32, False), (8, -1, False),
                                               (4, -1, False)])  # fmt: skip
def test_gemv_gptq_matches_float64(bits, gs, act_order):
    layer = _layer(256, 96, bits, gs, act_order, bias=True)
    x = torch.randn(1, 256)
    y = triton_w4a16.w_int_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, bits, layer.bias)
    ref = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    assert y.shape == (1, 96) and _rel(y, ref) < 1e-6


def test_gemv_is_the_m1_path_and_magic_unpack_is_exact(monkeypatch):
    """M = 1 goes through the GEMV (patched out, the result changes path but not value), and the
    magic-number unpack gives the same fp32 sums as shift-mask-convert, bit for bit."""
    layer = _layer(512, 64, 4, 128, False)
    x = torch.randn(1, 512)
    args = (x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4)
    calls = []
    real = triton_w4a16.gemv_gptq
    monkeypatch.setattr(triton_w4a16, "gemv_gptq", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_magic = triton_w4a16.w_int_matmul(*args)
    assert calls == [1]
    monkeypatch.setattr(triton_gemv, "MAGIC_UNPACK", False)
    y_plain = triton_w4a16.w_int_matmul(*args)
    assert torch.equal(y_magic, y_plain)
    y_dot = triton_w4a16.w_int_matmul(*args, block_n=32)  # pinned tile: the tl.dot kernel
    torch.testing.assert_close(y_magic, y_dot, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order,gs", [(False, 64), (True, 64), (False, -1)])
def test_prefill_dequantize_then_matmul(act_order, gs):
    """M >= DEQUANT_MIN_M: the weight dequantized once (sorted rows; act-order through the repacked copy
    and permuted activations) then one matmul."""
    layer = _layer(256, 48, 4, gs, act_order, bias=True)
    x = torch.randn(triton_w4a16.DEQUANT_MIN_M, 256)
    y = triton_w4a16.w_int_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, layer.bias)
    ref = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    assert _rel(y, ref) < 1e-6


def test_dequantize_gather_path_matches_sorted():
    layer = _layer(256, 48, 4, 64, False)
    a = triton_w4a16.dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, torch.float32, 0)
    b = triton_w4a16.dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, torch.float32, 64)
    assert torch.equal(a, b)
    assert torch.equal(a, layer.dequantized_weight().t().float())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("m", [1, 512])
def test_ternary_gemv_and_prefill(per_channel, m):
    g = torch.Generator().manual_seed(1)
    K, N = 256, 40
    codes = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) + 0.5 if per_channel else torch.full((1,), 0.7)
    x = torch.randn(m, K, generator=g)
    y = triton_ternary.ternary_matmul(x, T.pack_ternary(codes), s, out_dtype=torch.float32)
    ref = (x.double() @ codes.double().t()) * s.double().reshape(1, -1)
    assert _rel(y, ref) < 1e-6


def test_ternary_gemv_int8_activations_exact():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-1, 2, (24, 128), generator=g, dtype=torch.int8)
    xq = torch.randint(-127, 128, (1, 128), generator=g, dtype=torch.int8)
    y = triton_ternary.ternary_matmul(xq, T.pack_ternary(codes), torch.ones(1), torch.ones(1))
    assert torch.equal(y.to(torch.int64), T.reference_ternary_matmul(xq, codes))


def test_gemv_ternary_refuses_unaligned_k():
    with pytest.raises(ValueError, match="K % 16"):
        triton_gemv.gemv_ternary(torch.randn(1, 60), torch.zeros(4, 15, dtype=torch.uint8), torch.ones(1))


def test_packed_linear_compiles_fullgraph_through_the_custom_op():
    """Under torch.compile the W4A16 forward is one opaque op (dynamo cannot trace the wrapper's data-dependent
    g_idx analysis): fullgraph compiles and gives the eager result."""
    layer = _layer(256, 64, 4, 128, True, bias=True)
    x = torch.randn(1, 3, 256)
    eager = triton_w4a16.triton_int_linear(x, layer)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: triton_w4a16.triton_int_linear(t, layer), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)


def test_ternary_and_int8_kernels_compile_fullgraph_through_custom_ops():
    """The ternary and W8A8 Triton GEMMs are opaque ops under torch.compile too (fullgraph; eager result)."""
    from quantbench.kernels import triton_int8
    from quantbench.kernels.int8mm import quantize_per_token, quantize_weight_per_channel

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (40, 64), generator=g, dtype=torch.int8)
    packed, s = T.pack_ternary(codes), torch.full((1,), 0.5)
    x = torch.randn(5, 64, generator=g)
    wq, ws = quantize_weight_per_channel(torch.randn(48, 64, generator=g))
    xq, xs = quantize_per_token(x)
    cases = [(lambda t: triton_ternary.ternary_matmul(t, packed, s, out_dtype=torch.float32), x),
             (lambda t: triton_int8.int8_matmul_triton(t, xs, wq, ws), xq)]
    for f, arg in cases:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(arg), f(arg), rtol=0, atol=0)
