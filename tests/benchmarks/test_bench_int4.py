"""GEMV (decode, M=1) and GEMM (prefill, M=512) over packed int4 weights vs fp32 and bf16 on CPU.

Timed by pytest-benchmark (``--benchmark-enable``); in the default run each case runs once as a
correctness test against the fp32 matmul of the same dequantized weight.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from quantbench.kernels import intmm
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.rtn import rtn_quantize_weight

SHAPES = {"576x1536": (576, 1536), "1536x576": (1536, 576), "2048x2048": (2048, 2048)}


@functools.cache
def int4_layer(in_f: int, out_f: int) -> IntQuantLinear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, s, z = rtn_quantize_weight(w, 4, 128, False)
    return IntQuantLinear.from_codes(codes, s, z, 4, 128)


@functools.cache
def dequantized(in_f: int, out_f: int) -> torch.Tensor:
    return int4_layer(in_f, out_f).dequantized_weight()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("m", [1, 512], ids=["gemv", "gemm512"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int4pack"])
def test_bench_int4(benchmark, kind, shape, m):
    in_f, out_f = SHAPES[shape]
    layer = int4_layer(in_f, out_f)  # built once per shape
    w = dequantized(in_f, out_f)
    x = torch.randn(m, in_f)
    ref = F.linear(x, w)
    if kind == "fp32":
        fn, args = F.linear, (x, w)
    elif kind == "bf16":
        fn, args = F.linear, (x.bfloat16(), w.bfloat16())
    else:
        intmm.int4pack_linear(x, layer)  # build the cached packed weight outside the timing
        fn, args = intmm.int4pack_linear, (x.bfloat16(), layer)
    benchmark.extra_info.update(
        kind=kind,
        shape=shape,
        m=m,
        weight_bytes=int(layer.qweight.numel() * 4)
        if kind == "int4pack"
        else int(w.numel() * (2 if kind == "bf16" else 4)),
    )
    out = benchmark(fn, *args).float()
    err = (out - ref).pow(2).sum() / ref.pow(2).sum()
    assert 10 * torch.log10(1 / err) > (200 if kind == "fp32" else 40)
