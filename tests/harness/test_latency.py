"""Latency metrics on tiny_llama: protocol contents, roofline arithmetic, noise flags, KV bytes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.harness.measure import METRICS, CellContext, cell_params, latency
from quantbench.harness.run.suite import parse_suite
from quantbench.methods.base import ConfigError, build_method

LAT = {"prompt_len": 16, "context": 16, "decode_tokens": 4, "batch": 1, "repeats": 2, "warmup": 1}


def make_ctx(method: str = "fp", params: dict | None = None, tasks=None, latency_p=None) -> CellContext:
    lm = tiny_llama()
    raw = {"name": "t", "models": ["tiny-llama"], "cells": [{"name": "c", "method": method, "params": params or {}}],
           "latency": latency_p or LAT}
    if tasks:
        raw["tasks"] = tasks
    suite = parse_suite(raw)
    m = build_method(method, params or {})
    model = m.quantize(lm.model, None).eval()
    eval_data = SimpleNamespace(protocol={})
    ctx = CellContext("c", model, lm, eval_data, None, [m], 0.0, 0, params=cell_params(suite, suite.cells[0]))
    ctx.memo["eval"] = None  # metrics here never need the perplexity pass
    return ctx


def test_latency_params_validation():
    assert latency.validate_params("s.latency", {"batch": 2})["batch"] == 2
    with pytest.raises(ConfigError, match="unknown latency key 'contxt'.*context"):
        parse_suite({"name": "t", "models": ["tiny-llama"], "cells": ["fp"], "latency": {"contxt": 4}})
    with pytest.raises(ConfigError, match="repeats must be a positive integer"):
        parse_suite({"name": "t", "models": ["tiny-llama"], "cells": [{"method": "fp", "latency": {"repeats": 0}}]})
    s = parse_suite({"name": "t", "models": ["tiny-llama"], "latency": {"context": 8},
                     "cells": [{"method": "fp", "latency": {"batch": 2}}, {"method": "rtn"}]})
    assert cell_params(s, s.cells[0])["latency"] == latency.LatencyParams(prompt_len=512, context=8, batch=2)
    assert cell_params(s, s.cells[1])["latency"] == latency.LatencyParams(context=8)
    assert cell_params(s, s.cells[1])["tasks"] is None  # no tasks: block


def test_prefill_decode_records():
    ctx = make_ctx("rtn", {"bits": 4, "group_size": 64})
    (pre,) = METRICS["prefill_tokens_per_s"].compute(ctx)
    (dec,) = METRICS["decode_ms_per_token"].compute(ctx)
    r = ctx.memo["latency"]
    assert len(r["prefill_s"]) == 2 and r["decode_steps"] == 2 * 4
    assert pre.value == pytest.approx(16 / (sum(r["prefill_s"]) / 2), rel=1e-9)  # median of 2 = mean
    assert dec.value > 0 and dec.protocol["decode_ms_p90"] >= dec.value
    # roofline: (weight bytes + KV bytes read) / p50 against the measured copy bandwidth
    from quantbench.methods.base import model_storage

    wb = model_storage(ctx.model)["total"].total
    assert r["weight_bytes"] == wb
    # tiny llama: 2 layers x (K+V) x 2 kv heads x 64 dims x fp32 = 2048 bytes per token
    assert r["kv_bytes_read_per_step"] == pytest.approx(2048 * (16 + 2), rel=1e-9)
    gbs = (wb + r["kv_bytes_read_per_step"]) / (dec.value / 1e3) / 1e9
    assert r["achieved_gb_s"] == pytest.approx(gbs, rel=1e-6)
    assert r["roofline_pct"] == pytest.approx(100 * gbs / r["memory_bandwidth_gb_s"], rel=1e-6)
    for k in ("load1_before", "other_processes_cpu_cores", "noisy", "noisy_reasons", "cache"):
        assert k in dec.protocol
    assert dec.protocol["cache"] == "DynamicCache"


def test_noisy_flag(monkeypatch):
    ctx = make_ctx()
    steps = iter([0.001, 0.001, 0.001, 0.010] * 10)
    monkeypatch.setattr(latency, "_decode", lambda m, ids, n, kv, dec=None: [next(steps) for _ in range(n)])
    r = latency.measure_latency(ctx)
    assert r["noisy"] and any("p90/p50" in x for x in r["noisy_reasons"])


def test_percentiles():
    assert latency._pct([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert latency._pct([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)


def test_kv_bytes_per_token_fp():
    ctx = make_ctx()
    (r,) = METRICS["kv_bytes_per_token"].compute(ctx)
    assert r.value == 2048.0 and r.protocol["cache"] == "DynamicCache"


def test_kv_bytes_per_token_kv_method():
    pytest.importorskip("quantbench.methods.kvquant")
    try:
        ctx = make_ctx("kv-uniform", {"bits": 4})
    except ConfigError as e:
        pytest.skip(f"kv-uniform params differ: {e}")
    (r,) = METRICS["kv_bytes_per_token"].compute(ctx)
    # 4-bit codes are 1/8 of fp32 (512 B of 2048) plus per-token scales: well under a quarter of fp32
    assert 256 <= r.value < 2048 / 3, r.protocol
    assert r.protocol["cache"] == "DynamicCache[QuantizedKVLayer]"  # the real quantized cache, named
    assert ctx.kv_method is ctx.methods[0] and type(ctx.kv_method).quantizes("kv")


def test_decode_through_the_kv_methods_cache():
    ctx = make_ctx("kivi", {"bits": 2, "group_size": 8, "residual_length": 8})
    (dec,) = METRICS["decode_ms_per_token"].compute(ctx)
    assert dec.protocol["cache"] == "quantbench.methods.kvquant.make_cache"
    assert dec.protocol["decode_steps"] == 2 * 4 and dec.value > 0


def test_bandwidth_cached():
    a = latency.memory_bandwidth("cpu", nbytes=8 << 20)
    assert a > 1e8 and latency.memory_bandwidth("cpu", nbytes=8 << 20) == a
    assert torch.get_num_threads() >= 1


def test_gguf_cell_latency_is_llamacpps_or_unavailable(monkeypatch, tmp_path):
    """A llamacpp cell never reports quantbench's dequantized forward as the format's latency (issue T item 4)."""
    from quantbench.harness.tools import llamacpp

    monkeypatch.setenv("QUANTBENCH_LLAMACPP", str(tmp_path / "absent"))
    ctx = make_ctx("llamacpp", {"preset": "Q8_0"})
    (dec,) = METRICS["decode_ms_per_token"].fn(ctx)
    (pre,) = METRICS["prefill_tokens_per_s"].fn(ctx)
    for r in (dec, pre):
        assert r.status == "unavailable" and r.value is None
        assert "llama-bench" in r.error and "setup_llamacpp.sh" in r.error
        assert r.protocol["engine"] == "llama.cpp"
    assert llamacpp.tool("llama-bench") is None


def test_llamabench_json_is_read_per_repetition(monkeypatch, tmp_path):
    """The engine's samples: prefill tokens/s and decode ms/token per llama-bench repetition, and the
    decode test runs at the cache depth of the suite's context."""
    from quantbench.harness.tools import llamacpp

    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "llama-bench"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("QUANTBENCH_LLAMACPP", str(tmp_path))
    calls = []

    def fake(cmd):
        calls.append(cmd)
        if cmd[cmd.index("-n") + 1] == "0":
            return {"samples_ns": [int(0.5e9), int(0.25e9)], "build_commit": "abc"}
        return {"samples_ns": [int(80e6), int(40e6), int(60e6)], "build_commit": "abc"}

    monkeypatch.setattr(llamacpp, "_bench_json", fake)
    r = llamacpp.bench(tmp_path / "m.gguf", prompt_len=256, context=128, decode_tokens=8, repeats=3, threads=2)
    assert r["prefill_tokens_per_s_samples"] == pytest.approx([512.0, 1024.0])
    assert r["decode_ms_samples"] == pytest.approx([10.0, 5.0, 7.5])
    dec_cmd = calls[1]
    assert dec_cmd[dec_cmd.index("-d") + 1] == "128" and dec_cmd[dec_cmd.index("-t") + 1] == "2"
    with pytest.raises(ValueError, match="batch 1"):
        llamacpp.bench(tmp_path / "m.gguf", 256, 128, 8, 3, 2, batch=4)


@pytest.mark.parametrize(("method", "params", "expect_ref"), [
    ("rtn", {"bits": 4, "group_size": 64}, False),  # packed int kernel
    ("mxfp4", {}, True),  # FP4 codes dequantized into an fp32 GEMM: never the format's speed here
    ("fp8-weight", {}, True),  # weight-only FP8 dequantizes to the activation dtype
])
def test_latency_protocol_names_reference_paths(method, params, expect_ref):
    ctx = make_ctx(method, params)
    (dec,) = METRICS["decode_ms_per_token"].compute(ctx)
    paths = ctx.memo["latency"]["kernel_paths"]
    n = 7 * 2  # tiny llama: 2 blocks x 7 linears, every one quantized
    assert paths == ({"native": 0, "reference": n} if expect_ref else {"native": n, "reference": 0})
    assert dec.protocol["reference_path"] is expect_ref


def test_compile_key_validates_and_tags():
    assert latency.validate_params("s.latency", {"compile": True})["compile"] is True
    assert latency.validate_params("s.latency", {})["compile"] is False
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match="latency.compile must be true or false"):
            parse_suite({"name": "t", "models": ["tiny-llama"], "cells": ["fp"], "latency": {"compile": bad}})
    s = parse_suite({"name": "t", "models": ["tiny-llama"], "latency": {"compile": True},
                     "cells": [{"method": "fp", "latency": {"compile": False}}, {"method": "rtn"}]})
    assert cell_params(s, s.cells[0])["latency"].compile is False
    assert cell_params(s, s.cells[1])["latency"].compile is True
    p = {"prompt_len": 16, "context": 16, "batch": 1}
    assert latency.latency_tag({**p, "compile": False}) == latency.latency_tag(p) == "prompt_len16/context16/batch1"
    assert latency.latency_tag({**p, "compile": True}) == "prompt_len16/context16/batch1/compiled"


def test_compiled_latency_record_protocol(monkeypatch):
    """``compile: true``: the decode runs through the cell's StaticDecoder (here with its step left eager, so
    the test does not pay a compile) and the record states the mode, cache, compile seconds and the floor."""
    from quantbench.methods import timing

    made = []

    def uncompiled(model, max_len, **kw):
        made.append(timing.StaticDecoder(model, max_len, compile=False))
        return made[-1]

    monkeypatch.setattr(latency, "StaticDecoder", uncompiled)
    ctx = make_ctx("rtn", {"bits": 4, "group_size": 64}, latency_p={**LAT, "compile": True})
    (dec,) = METRICS["decode_ms_per_token"].compute(ctx)
    assert len(made) == 1 and made[0].max_len == 16 + 4  # context + decode_tokens, one decoder per cell
    r = ctx.memo["latency"]
    assert r["compile"] is True and r["decode_mode"] == "static-eager" and r["cache"] == "StaticCache"
    assert r["decode_steps"] == 2 * 4 and "compile_s" in r and r["compile_fallback"] is None
    assert METRICS["decode_ms_per_token"].protocol_tag(dec.protocol).endswith("/compiled")
    # a static cache's step attends over all its slots: 2048 KV bytes per token x (16 + 4)
    assert r["kv_bytes_read_per_step"] == 2048 * 20
    floor = (r["weight_bytes"] + r["kv_bytes_read_per_step"]) / (r["memory_bandwidth_gb_s"] * 1e9)
    assert r["stream_floor_ms"] == pytest.approx(1e3 * floor, rel=1e-9)
    assert r["above_floor_ms"] == pytest.approx(dec.value - 1e3 * floor, rel=1e-9)


def test_compile_keeps_a_kv_methods_own_cache():
    ctx = make_ctx("kivi", {"bits": 2, "group_size": 8, "residual_length": 8}, latency_p={**LAT, "compile": True})
    (dec,) = METRICS["decode_ms_per_token"].compute(ctx)
    assert dec.protocol["cache"] == "quantbench.methods.kvquant.make_cache" and dec.protocol["decode_mode"] == "eager"
    assert "kivi" in dec.protocol["compile_fallback"] and "static_decoder" not in ctx.memo
