"""Triton W8A8 kernel vs the pure-torch reference, under the Triton interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench.kernels import int8mm  # noqa: E402

triton_int8 = pytest.importorskip("quantbench.kernels.triton_int8")
pytestmark = pytest.mark.triton


def operands(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xq, xs = int8mm.quantize_per_token(torch.randn(m, k, generator=g))
    wq, ws = int8mm.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    return xq, xs, wq, ws, torch.randn(n, generator=g)


@pytest.mark.parametrize("m", [1, 16, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_int8_matches_reference(m, bias):
    xq, xs, wq, ws, b = operands(m, 200, 72)  # K, N not multiples of the blocks: masks matter
    b = b if bias else None
    out = triton_int8.int8_matmul_triton(xq, xs, wq, ws, b)
    ref = int8mm.int8_matmul_reference(xq, xs, wq, ws, b)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_static_scale_strided_weight_and_bad_shapes():
    xq, _, wq, ws, b = operands(20, 128, 48)
    s = torch.tensor(0.02)
    wt = wq.t().contiguous().t()  # non-contiguous [N, K] view
    out = triton_int8.int8_matmul_triton(xq, s, wt, ws, b)
    ref = int8mm.int8_matmul_reference(xq, s.expand(20), wq, ws, b)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    with pytest.raises(ValueError):
        triton_int8.int8_matmul_triton(xq.float(), s, wq, ws)
    with pytest.raises(ValueError):
        triton_int8.int8_matmul_triton(xq[:, :64], s, wq, ws)
