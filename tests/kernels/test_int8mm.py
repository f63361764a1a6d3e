"""W8A8 int8 GEMM: torch._int_mm path and quantizers vs the pure-torch reference."""

import pytest
import torch

from quantbench.kernels import int8mm


def operands(m, k, n, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g).mul(4)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    xq, xs = int8mm.quantize_per_token(x)
    wq, ws = int8mm.quantize_weight_per_channel(w)
    return x, w, b, xq, xs, wq, ws


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 100, 30), (33, 1536, 96)])
def test_intmm_matches_reference(m, k, n):
    _, _, b, xq, xs, wq, ws = operands(m, k, n)
    out = int8mm.int8_matmul_intmm(xq, xs, wq, ws, b)
    ref = int8mm.int8_matmul_reference(xq, xs, wq, ws, b)
    # both sum the same integer products exactly; only the fp32 rescale can differ in rounding
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # the int32 accumulator itself is exact
    acc = torch._int_mm(xq, wq.t())
    assert torch.equal(acc.long(), xq.long() @ wq.long().t())


def test_quantizers():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 3.0, -127.0]])
    q, s = int8mm.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    torch.testing.assert_close(s, torch.tensor([2 / 127, int8mm.EPS / 127, 1.0]))
    assert q[0].tolist() == [64, -127, 32]  # 1 / (2/127) = 63.5 in fp32 rounds (half to even) to 64
    assert q[1].tolist() == [0, 0, 0]
    qs, ss = int8mm.quantize_per_tensor(x, 0.5)
    assert ss.shape == (3,) and qs[2].tolist() == [127, 6, -127] and qs[0].tolist() == [2, -4, 1]


def test_w8a8_error_is_small():
    x, w, b, xq, xs, wq, ws = operands(16, 256, 64)
    ref = x @ w.t() + b
    out = int8mm.int8_matmul(xq, xs, wq, ws, b)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 30, sqnr


def test_fake_quantize_matches_codes():
    x = torch.randn(5, 40)
    q, s = int8mm.quantize_per_token(x)
    torch.testing.assert_close(int8mm.fake_quantize(x), q.float() * s[:, None])
    fq = int8mm.fake_quantize(x, per_token=False)
    assert (fq / (x.abs().max() / 127)).sub((fq / (x.abs().max() / 127)).round()).abs().max() < 1e-4
