"""Prefill (M=512) through W8A8 int8 (torch._int_mm + one rescale, activation quantization included) vs fp32 on CPU.

Two cases: one 576x1536 linear (SmolLM2's up_proj) and a whole decoder-layer stack of linears
(q, k, v, o, gate, up, down at SmolLM2's shapes).  Timed by pytest-benchmark (``--benchmark-enable``);
in the default run each case runs once as a correctness test against fp32 (SQNR floor).
"""

import pytest
import torch
from torch import nn

from quantbench.methods.w8a8_linear import W8A8Linear

M = 512
LAYER = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
         "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linears(case: str) -> list[nn.Linear]:
    torch.manual_seed(0)
    shapes = [LAYER["up_proj"]] if case == "linear-576x1536" else list(LAYER.values())
    return [nn.Linear(i, o, bias=False) for i, o in shapes]


def run_stack(mods, xs):
    return [m(x) for m, x in zip(mods, xs)]


@pytest.mark.parametrize("case", ["linear-576x1536", "layer-stack"])
@pytest.mark.parametrize("kind", ["fp32", "w8a8-int8"])
def test_bench_int8_prefill(benchmark, kind, case):
    fp = linears(case)
    xs = [torch.randn(M, m.in_features) for m in fp]
    mods = fp if kind == "fp32" else [W8A8Linear.from_linear(m) for m in fp]
    flops = sum(2 * M * m.in_features * m.out_features for m in fp)
    benchmark.extra_info.update(kind=kind, case=case, m=M, gops=flops / 1e9)
    with torch.no_grad():
        outs = benchmark(run_stack, mods, xs)
        refs = run_stack(fp, xs)
    for out, ref in zip(outs, refs):
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
        assert sqnr > (100 if kind == "fp32" else 30), sqnr
    if benchmark.stats:  # timed run: prefill tokens/s
        benchmark.extra_info["prefill_tokens_per_s"] = M / benchmark.stats["median"]


@pytest.mark.parametrize("m", [1, 512], ids=["gemv", "gemm512"])
@pytest.mark.parametrize("kind", ["fp32", "w8-reference", "w8-int8pack"])
def test_bench_w8_weight_only(benchmark, kind, m):
    """Weight-only 8-bit per-channel (rtn-w8) at the down_proj shape: the unpack-every-call
    reference path vs the ``_weight_int8pack_mm`` fast path vs fp32."""
    from quantbench.kernels import intmm
    from quantbench.methods.qlinear import IntQuantLinear
    from quantbench.methods.rtn import rtn_quantize_weight

    in_f, out_f = LAYER["down_proj"]
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, s, z = rtn_quantize_weight(w, 8, -1, False)
    layer = IntQuantLinear.from_codes(codes, s, z, 8, -1)
    wd = layer.dequantized_weight()
    x = torch.randn(m, in_f)
    fn = {"fp32": lambda: x @ wd.T, "w8-reference": lambda: intmm.reference_linear(x, layer),
          "w8-int8pack": lambda: intmm.int8pack_linear(x, layer)}[kind]
    fn()  # builds the cached int8 weight outside the timing
    benchmark.extra_info.update(kind=kind, m=m, shape=f"{in_f}x{out_f}")
    with torch.no_grad():
        out = benchmark(fn)
    ref = x @ wd.T
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > (100 if kind != "w8-int8pack" else 40), sqnr
