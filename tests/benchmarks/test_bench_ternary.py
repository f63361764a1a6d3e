"""Decode GEMV (M=1) over ternary weights: fp32 vs bf16 F.linear vs the ternary paths: TernaryLinear's decode
(the 2-bit packed codes, ``kernels/ternary_cpu.cpp``) and int8 x int8 ``torch._int_mm`` on the cached int8 codes.

Timed by pytest-benchmark (``--benchmark-enable``); in the default run each case runs once as a correctness
test against the fp64 product of the same quantized activations and codes.
"""

import pytest
import torch
import torch.nn.functional as F

from quantbench.kernels import ternary as T
from quantbench.methods.bitnet import TernaryLinear, ternary_codes

SHAPES = {"576x1536": (576, 1536), "1536x576": (1536, 576), "2048x2048": (2048, 2048)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "ternary-packed", "ternary-int_mm", "ternary-addsub",
                                  "ternary-bf16-dequant"])
def test_bench_ternary(benchmark, kind, shape):
    in_f, out_f = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    codes, gamma = ternary_codes(w)
    layer = TernaryLinear.from_codes(codes, gamma)
    x = torch.randn(1, in_f, generator=g)
    xq, qb = T.act_quant_int8(x)
    ref = (xq.double() @ codes.double().T) * gamma.double() / qb.double()
    wq = codes.float() * gamma
    if kind == "fp32":
        out = benchmark(F.linear, x, wq)
        torch.testing.assert_close(out.double(), x.double() @ wq.double().T, rtol=1e-4, atol=1e-4)
        return
    if kind == "bf16":
        wb, xb = wq.bfloat16(), x.bfloat16()
        out = benchmark(F.linear, xb, wb)
        torch.testing.assert_close(out.double(), x.double() @ wq.double().T, rtol=3e-2, atol=3e-2)
        return
    if kind == "ternary-packed":
        out = benchmark(layer, x)  # M = 1: the 2-bit kernel where it is built, else int_mm
    elif kind == "ternary-int_mm":
        ct = layer._codes_transposed()
        out = benchmark(T.ternary_linear, x, ct, layer.scale.view(-1))
    elif kind == "ternary-addsub":
        pos, neg = T.addsub_index(codes)
        out = benchmark(lambda: T.addsub_ternary(*T.act_quant_int8(x)[:1], pos, neg).float() * gamma / qb)
    else:
        out = benchmark(lambda: T.dequant_bf16_matmul(xq.float(), codes, gamma).float() / qb)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item())
