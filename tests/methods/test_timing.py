"""The decode timer's static-cache mode: compiled greedy decoding gives the eager loop's tokens, falls back
with its reason when the step cannot be traced, and times only the steps it is asked for."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.base import build_method
from quantbench.methods.timing import StaticDecoder, compile_mode, greedy_decode


def _rtn_model() -> torch.nn.Module:
    """tiny_llama with packed 4-bit RTN weights: its linears run the int4pack CPU op (kernels/intmm.py)."""
    return build_method("rtn", {"bits": 4, "group_size": 64}).quantize(tiny_llama().model, None).eval()


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


def test_compiled_decode_gives_the_eager_tokens():
    """The one inductor compile of the suite (~25-60 s on 2 cores): packed int4 linears trace with fullgraph."""
    model, ids = _rtn_model(), _ids()
    ref = greedy_decode(model, ids, 8, DynamicCache())
    dec = StaticDecoder(model, 12 + 8)
    times: list[float] = []
    got = dec.decode(ids, 8, times)
    p = dec.protocol()
    assert p["compile_fallback"] is None, p
    assert p["decode_mode"] == "compiled" and p["cache"] == "StaticCache" and p["compile_mode"] == "default"
    assert p["compile_s"] > 0 and len(times) == 8  # the compiling warm-up steps are not among the timed ones
    assert torch.equal(got, ref)
    again = dec.decode(ids, 8)  # the reused cache is reset: the same prompt gives the same tokens
    assert torch.equal(again, ref)
    short = dec.decode(ids[:, :5], 3)  # a shorter prompt in the same static cache, no stale entries
    assert torch.equal(short, greedy_decode(model, ids[:, :5], 3, DynamicCache()))


def test_static_cache_eager_step_matches_dynamic_cache():
    model, ids = tiny_llama().model, _ids()
    dec = StaticDecoder(model, 20, compile=False)
    times: list[float] = []
    assert torch.equal(dec.decode(ids, 6, times), greedy_decode(model, ids, 6, DynamicCache()))
    assert len(times) == 6 and dec.protocol()["decode_mode"] == "static-eager"
    assert dec.protocol()["compile_s"] is None
    with pytest.raises(ValueError, match="do not fit the static cache of 20"):
        dec.decode(ids, 9)


def test_untraceable_step_falls_back_to_the_eager_loop():
    """A module that breaks the graph cannot be compiled with fullgraph: the eager loop runs, reason recorded."""
    model, ids = tiny_llama().model, _ids()
    ref = greedy_decode(model, ids, 4, DynamicCache())
    mlp = model.model.layers[0].mlp
    inner = mlp.forward

    def breaking(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return inner(x)

    mlp.forward = breaking
    dec = StaticDecoder(model, 16)
    times: list[float] = []
    got = dec.decode(ids, 4, times)
    p = dec.protocol()
    assert p["compile_fallback"].startswith("Unsupported") and "graph_break" in p["compile_fallback"]
    assert p["decode_mode"] == "eager" and p["cache"] == "DynamicCache"
    assert torch.equal(got, ref) and len(times) == 4


def test_greedy_decode_clock_and_step():
    """``clock`` reads each step's time; ``step`` runs the one-token steps, the prefill runs the model."""
    model, ids = tiny_llama().model, _ids(4)
    calls: list[int] = []

    def step(x: torch.Tensor, **kw):
        calls.append(x.shape[1])
        return model(x, **kw)

    ticks = iter(range(100))
    times: list[float] = []
    out = greedy_decode(model, ids, 3, DynamicCache(), times, step=step, clock=lambda: float(next(ticks)))
    assert calls == [1, 1, 1] and times == [1.0, 1.0, 1.0] and out.shape == (1, 7)
    assert compile_mode(torch.device("cpu")) == "default" and compile_mode(torch.device("cuda")) == "reduce-overhead"


def test_timed_returns_the_result_and_the_clock_difference():
    import time as _time

    from quantbench.methods.timing import timed, timer_name

    ticks = iter([10.0, 10.25])
    out, sec = timed(torch.device("cpu"), lambda: 42, clock=lambda: next(ticks))
    assert out == 42 and sec == 0.25
    assert timer_name(torch.device("cpu")) == "perf_counter"
    assert timer_name(torch.device("cpu"), _time.thread_time) == "thread_time"
    assert timer_name(torch.device("cuda")) == "cuda events"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_timed_on_cuda_uses_events_and_agrees_with_a_synchronized_wall_clock():
    import time as _time

    from quantbench.methods.timing import timed

    a = torch.randn(4096, 4096, device="cuda")
    timed(torch.device("cuda"), lambda: a @ a)  # warm-up
    torch.cuda.synchronize()
    t = _time.perf_counter()
    _, sec = timed(torch.device("cuda"), lambda: [a @ a for _ in range(20)])
    wall = _time.perf_counter() - t
    assert 0 < sec <= wall * 1.05
