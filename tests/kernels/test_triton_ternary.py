"""Triton 2-bit ternary GEMM vs the torch reference, under the Triton interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels import ternary as T  # noqa: E402
from quantbench.methods.bitnet import TernaryLinear, ternary_codes  # noqa: E402

triton_ternary = pytest.importorskip("quantbench.kernels.triton_ternary")
pytestmark = pytest.mark.triton


@pytest.mark.parametrize("m,k,n", [(1, 128, 64), (19, 200, 48)])
def test_int8_activations_exact(m, k, n):
    g = torch.Generator().manual_seed(m + k)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    y = triton_ternary.ternary_matmul(xq, T.pack_ternary(codes), torch.ones(1), torch.ones(m))
    assert torch.equal(y.to(torch.int64), T.reference_ternary_matmul(xq, codes))


@pytest.mark.parametrize("per_channel", [False, True])
def test_float_activations(per_channel):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (40, 96), generator=g, dtype=torch.int8)
    s = torch.rand(40 if per_channel else 1, generator=g)
    x = torch.randn(128, 8, generator=g).t()  # non-contiguous [8, 128] -> take first 96 columns
    x = x[:, :96]
    y = triton_ternary.ternary_matmul(x, T.pack_ternary(codes), s)
    ref = x.double() @ (codes.double().T * s.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_linear_matches_cpu_packed_path(granularity):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 160, generator=g)
    codes, gamma = ternary_codes(w, granularity)
    layer = TernaryLinear.from_codes(codes, gamma, "2bit", granularity, bias=torch.randn(64, generator=g))
    x = torch.randn(2, 3, 160, generator=g)
    torch.testing.assert_close(triton_ternary.triton_ternary_linear(x, layer), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    p = T.pack_ternary(torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(ValueError):
        triton_ternary.ternary_matmul(torch.randn(2, 60), p, torch.ones(1))
    with pytest.raises(ValueError):
        triton_ternary.ternary_matmul(torch.zeros(2, 64, dtype=torch.int8), p, torch.ones(1))


def test_half_activations_fp32_accumulation():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-1, 2, (32, 128), generator=g, dtype=torch.int8)
    x = torch.randn(16, 128, generator=g).half()
    y = triton_ternary.ternary_matmul(x, T.pack_ternary(codes), torch.full((1,), 0.5), out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), x.double() @ codes.double().T * 0.5, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 21])
def test_k_not_a_multiple_of_four(m):
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-1, 2, (24, 130), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, 130), generator=g, dtype=torch.int8)
    y = triton_ternary.ternary_matmul(xq, T.pack_ternary(codes), torch.ones(1), torch.ones(m))
    assert torch.equal(y.to(torch.int64), T.reference_ternary_matmul(xq, codes))
    x = torch.randn(m, 130, generator=g)
    y = triton_ternary.ternary_matmul(x, T.pack_ternary(codes), torch.full((1,), 0.5))
    torch.testing.assert_close(y.double(), x.double() @ codes.double().T * 0.5, rtol=1e-5, atol=1e-5)
