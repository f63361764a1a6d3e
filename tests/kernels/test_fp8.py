"""FP8 E4M3 kernels: the format's values, the saturating round-to-nearest-even cast, absmax scales, and the
scaled GEMM (``torch._scaled_mm`` where this torch has it) against the exact reference."""

import pytest
import torch
import torch.nn.functional as F

from quantbench.kernels import fp8

E4M3 = torch.float8_e4m3fn


def _grid() -> torch.Tensor:
    """Every finite E4M3 value, from the 256 bit patterns, sorted and without -0."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    return torch.unique(v[~v.isnan()])


def _nearest_on_grid(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the grid value nearest to each (saturated) element (ties do not occur in random data)."""
    g = _grid()
    xc = x.clamp(-448, 448)
    return g[(xc.unsqueeze(-1) - g).abs().argmin(-1)]


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - approx.double()).pow(2).sum()))


def test_the_format_has_254_finite_values_two_nans_and_no_infinity():
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    assert int(v.isnan().sum()) == 2 and bool(v[0x7F].isnan()) and bool(v[0xFF].isnan())
    assert not bool(v.isinf().any())
    assert float(v[0x7E]) == 448.0 == fp8.E4M3_MAX == torch.finfo(E4M3).max  # S.1111.110
    assert float(v[0x01]) == 2.0**-9 == fp8.E4M3_MIN_SUBNORMAL  # smallest subnormal
    assert float(v[0x08]) == 2.0**-6  # smallest normal
    assert float(v[0x07]) == 7 * 2.0**-9  # largest subnormal
    assert float(v[0x38]) == 1.0 and float(v[0x39]) == 1.125  # bias 7, 3 mantissa bits
    g = _grid()
    assert len(g) == 253  # 126 positive, 126 negative, one zero
    assert torch.equal(g[g > 0], -g[g < 0].flip(0))


@pytest.mark.parametrize("x, expected", [
    (448.0, 448.0),
    (449.0, 448.0),  # saturates
    (464.0, 448.0),  # half-way to 480 (not a value): saturates
    (1000.0, 448.0),
    (-1e6, -448.0),
    (float("inf"), 448.0),
    (float("-inf"), -448.0),
    (0.1, 0.1015625),  # 13/128, the nearest E4M3 value
    (-3.3, -3.25),
    (17.0, 16.0),  # tie between 16 and 18: to the even mantissa (16)
    (19.0, 20.0),  # tie between 18 and 20: to the even mantissa (20)
    (240.0, 240.0),
    (1e-9, 0.0),
    (2.0**-9, 2.0**-9),  # the smallest subnormal is exact
    (2.0**-10, 0.0),  # tie between 0 and 2^-9: to even (0)
    (3 * 2.0**-10, 2.0**-8),  # tie between 2^-9 and 2^-8: to even (2 * 2^-9)
    (0.6 * 2.0**-9, 2.0**-9),
    (0.0, 0.0),
])
def test_cast_pins_e4m3_values(x, expected):
    assert float(fp8.cast_e4m3(torch.tensor([x])).float()) == expected


def test_cast_keeps_nan():
    assert bool(fp8.cast_e4m3(torch.tensor([float("nan")])).float().isnan().all())


def test_cast_is_the_nearest_grid_value():
    g = torch.Generator().manual_seed(0)
    mag = torch.exp(torch.empty(20000).uniform_(-12, 6.5, generator=g))  # 2^-17 .. 665: subnormals to saturation
    x = mag * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    q = fp8.cast_e4m3(x)
    assert q.dtype == E4M3 and q.element_size() == 1
    assert torch.equal(q.float(), _nearest_on_grid(x))


def test_every_value_of_the_format_round_trips():
    g = _grid()
    assert torch.equal(fp8.cast_e4m3(g).float(), g)


def test_per_channel_scale_is_amax_over_448():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[5] *= 1000.0  # a row with a very different range
    w[9] = 0.0  # an all-zero row
    q, s = fp8.quantize_e4m3(w, dim=1)
    assert q.shape == w.shape and q.dtype == E4M3 and s.shape == (64,) and s.dtype == torch.float32
    expected = w.abs().amax(1).clamp(min=fp8.AMAX_EPS) / 448.0
    assert torch.equal(s, expected)
    assert torch.equal(q.float(), _nearest_on_grid(w / expected.unsqueeze(1)))  # codes: the scaled row, rounded
    nz = [i for i in range(64) if i != 9]
    assert torch.equal(q.float().abs().amax(1)[nz], torch.full((63,), 448.0))  # each row's max lands on 448
    assert torch.equal(q[9].float(), torch.zeros(256)) and bool(torch.isfinite(s[9]))
    deq = fp8.dequantize_e4m3(q, s, dim=1)
    assert torch.equal(deq, q.float() * s.unsqueeze(1))
    # round to nearest: half a step, 2^-4 relative for normals, half the subnormal step (2^-10 * s) below
    bound = torch.maximum(w.abs() * 2.0**-4, s.unsqueeze(1) * 2.0**-10) * (1 + 1e-6)
    assert bool(((w - deq).abs() <= bound).all())


def test_per_token_and_per_tensor_scales():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    q, s = fp8.quantize_e4m3(x, dim=-1)
    assert s.shape == (3, 5) and torch.equal(s, x.abs().amax(-1) / 448.0)
    qt, st = fp8.quantize_e4m3(x, dim=None)
    assert st.shape == () and float(st) == float(x.abs().amax() / 448.0)
    assert torch.equal(fp8.dequantize_e4m3(qt, st, dim=None), qt.float() * st)
    fq = fp8.fake_quantize_e4m3(x.to(torch.bfloat16))
    assert fq.dtype == torch.bfloat16 and _sqnr_db(x, fq.float()) > 29.0


def test_quantization_sqnr_is_about_31_db_on_gaussian_rows():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    q, s = fp8.quantize_e4m3(w, dim=1)
    assert 30.0 < _sqnr_db(w, fp8.dequantize_e4m3(q, s, dim=1)) < 33.0


def _operands(m, k, n, seed=0, tensor_weight_scale=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + 10 * torch.rand(m, 1, generator=g))
    w = torch.randn(n, k, generator=g)
    xq, xs = fp8.quantize_e4m3(x, dim=-1)
    wq, ws = fp8.quantize_e4m3(w, dim=None if tensor_weight_scale else 1)
    return xq, xs, wq, ws, torch.randn(n, generator=g)


def test_reference_is_the_exact_product_of_the_dequantized_operands():
    xq, xs, wq, ws, b = _operands(7, 96, 40)
    y = fp8.fp8_matmul_reference(xq, xs, wq, ws, b)
    exact = (xq.double() * xs.double().unsqueeze(1)) @ (wq.double() * ws.double().unsqueeze(1)).t() + b.double()
    torch.testing.assert_close(y, exact.float(), rtol=1e-6, atol=1e-6)
    fp32 = F.linear(fp8.dequantize_e4m3(xq, xs), fp8.dequantize_e4m3(wq, ws, dim=1), b)
    assert _sqnr_db(y, fp32) > 110.0


needs_cpu_scaled_mm = pytest.mark.skipif(not fp8.cpu_has_scaled_mm(), reason="torch._scaled_mm has no CPU FP8 path")


@needs_cpu_scaled_mm
@pytest.mark.parametrize("m, k, n, tensor_ws", [(1, 64, 48, False), (5, 576, 192, False), (3, 17, 9, False),
                                                 (33, 256, 512, True)])
def test_cpu_scaled_mm_matches_the_reference(m, k, n, tensor_ws):
    xq, xs, wq, ws, b = _operands(m, k, n, seed=m, tensor_weight_scale=tensor_ws)
    ref = fp8.fp8_matmul_reference(xq, xs, wq, ws, b)
    y = fp8.fp8_matmul_scaled_mm(xq, xs, wq, ws, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert _sqnr_db(ref, y) > 100.0  # fp32 accumulation of exact products
    assert fp8.scaled_mm_applies(xq, wq)
    assert torch.equal(fp8.fp8_matmul(xq, xs, wq, ws, b), y)  # the dispatcher takes it on CPU


def test_dispatch_falls_back_to_the_reference(monkeypatch):
    xq, xs, wq, ws, b = _operands(4, 32, 16)
    monkeypatch.setattr(fp8, "USE_SCALED_MM", False)
    assert not fp8.scaled_mm_applies(xq, wq)
    assert torch.equal(fp8.fp8_matmul(xq, xs, wq, ws, b), fp8.fp8_matmul_reference(xq, xs, wq, ws, b))
    monkeypatch.setattr(fp8, "USE_SCALED_MM", True)
    empty = xq[:0]
    assert not fp8.scaled_mm_applies(empty, wq) and fp8.fp8_matmul(empty, xs[:0], wq, ws, b).shape == (0, 16)


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8.cuda_supports_scaled_mm(torch.device("cuda"))),
                    reason="needs a CUDA device with compute capability >= 8.9")
@pytest.mark.parametrize("m, k, n", [(1, 576, 1536), (48, 576, 192), (5, 40, 24)])
def test_cuda_scaled_mm_matches_the_reference(m, k, n):  # pragma: no cover - needs an FP8 GPU
    xq, xs, wq, ws, b = (t.cuda() for t in _operands(m, k, n))
    ref = fp8.fp8_matmul_reference(xq, xs, wq, ws, b)
    y = fp8.fp8_matmul(xq, xs, wq, ws, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert fp8.scaled_mm_applies(xq, wq) == (k % 16 == 0 and n % 16 == 0)
    assert _sqnr_db(ref, y) > 45.0  # bf16 output of the row-wise GEMM
