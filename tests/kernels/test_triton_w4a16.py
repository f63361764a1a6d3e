"""Triton W4A16 kernel vs the pure-torch reference, under the Triton interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels.intmm import reference_linear  # noqa: E402
from quantbench.methods.gptq_solver import gptq_quantize  # noqa: E402
from quantbench.methods.qlinear import IntQuantLinear  # noqa: E402

triton_w4a16 = pytest.importorskip("quantbench.kernels.triton_w4a16")
pytestmark = pytest.mark.triton


def make_layer(in_f, out_f, bits, gs, act_order, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(in_f, 256, generator=g) * torch.rand(in_f, 1, generator=g).mul(3)
    r = gptq_quantize(W, 2 * X @ X.T / 256, bits, gs, act_order=act_order)
    b = torch.randn(out_f, generator=g) if bias else None
    return IntQuantLinear.from_codes(r.codes, r.scales, r.zeros, bits, gs, g_idx=r.g_idx, bias=b)


@pytest.mark.parametrize("m", [1, 16, 37])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_matches_reference(m, act_order):
    layer = make_layer(256, 96, 4, 64, act_order, bias=True)
    assert layer.has_act_order() == act_order
    x = torch.randn(m, 256)
    out = triton_w4a16.triton_int_linear(x, layer)
    ref = reference_linear(x, layer)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("bits,gs", [(2, 32), (8, -1), (4, -1)])
def test_other_bit_widths_and_per_channel(bits, gs):
    layer = make_layer(128, 64, bits, gs, act_order=True, bias=False)
    x = torch.randn(3, 5, 128)  # leading dims flattened
    out = triton_w4a16.triton_int_linear(x, layer)
    ref = reference_linear(x, layer)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_strided_input_and_bad_shapes():
    layer = make_layer(128, 32, 4, 32, act_order=False, bias=False)
    x = torch.randn(128, 8).t()  # non-contiguous [8, 128]
    out = triton_w4a16.w_int_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4)
    torch.testing.assert_close(out, reference_linear(x.contiguous(), layer), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError):
        triton_w4a16.w_int_matmul(torch.randn(2, 64), layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4)
    with pytest.raises(ValueError):
        triton_w4a16.w_int_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 3)


def test_layout_analysis_sorted_act_order_and_gather():
    sorted_layer = make_layer(256, 32, 4, 64, act_order=False, bias=False)
    act_layer = make_layer(256, 32, 4, 64, act_order=True, bias=False)
    lay = triton_w4a16._layout(sorted_layer.qweight, sorted_layer.g_idx, 4, 4)
    assert lay.gs == 64 and lay.perm is None and lay.qweight is sorted_layer.qweight
    lay = triton_w4a16._layout(act_layer.qweight, act_layer.g_idx, 4, 4)
    assert lay.gs == 64 and lay.perm is not None
    # the repacked weight holds the codes of rows perm, in sorted-group order
    from quantbench.kernels.intq import unpack_rows

    codes = unpack_rows(act_layer.qweight, 4, 256)
    torch.testing.assert_close(unpack_rows(lay.qweight, 4, 256), codes[lay.perm.long()])
    assert torch.equal(act_layer.g_idx[lay.perm.long()].long(), torch.arange(256) // 64)
    # cached per tensor pair, and recomputed after an in-place change
    assert triton_w4a16._layout(act_layer.qweight, act_layer.g_idx, 4, 4) is lay
    odd = act_layer.g_idx.clone()
    odd[:3] = torch.tensor([3, 3, 3])  # no longer a permutation of equal groups: gather path
    assert triton_w4a16._layout(act_layer.qweight, odd, 4, 4).gs == 0


@pytest.mark.parametrize("m", [1, 20])
def test_gather_path_for_irregular_groups(m):
    layer = make_layer(128, 64, 4, 32, act_order=True, bias=True)
    g = torch.Generator().manual_seed(3)
    layer.g_idx.copy_(torch.randint(0, 4, (128,), generator=g, dtype=torch.int32))
    x = torch.randn(m, 128)
    torch.testing.assert_close(
        triton_w4a16.triton_int_linear(x, layer), reference_linear(x, layer), rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_then_matmul_path(monkeypatch, act_order):
    monkeypatch.setattr(triton_w4a16, "DEQUANT_MIN_M", 8)
    layer = make_layer(200, 40, 4, 64, act_order, bias=True)  # K not a multiple of the tiles
    x = torch.randn(9, 200)
    torch.testing.assert_close(
        triton_w4a16.triton_int_linear(x, layer), reference_linear(x, layer), rtol=1e-4, atol=1e-3
    )


def test_pinned_tiles_and_k_edge():
    layer = make_layer(200, 40, 4, 64, act_order=True, bias=False)  # last group holds 8 rows
    for m in (1, 17):
        x = torch.randn(m, 200)
        out = triton_w4a16.w_int_matmul(
            x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4, block_m=16, block_n=32, block_k=32
        )
        torch.testing.assert_close(out, reference_linear(x, layer), rtol=1e-4, atol=1e-3)
        out = triton_w4a16.triton_int_linear(x, layer)
        torch.testing.assert_close(out, reference_linear(x, layer), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_variants(monkeypatch, compact, bits):
    monkeypatch.setattr(triton_w4a16, "COMPACT_UNPACK", compact)
    layer = make_layer(256, 64, bits, 64, act_order=True, bias=False)
    for m in (1, 24):
        x = torch.randn(m, 256)
        torch.testing.assert_close(
            triton_w4a16.triton_int_linear(x, layer), reference_linear(x, layer), rtol=1e-4, atol=1e-3
        )
