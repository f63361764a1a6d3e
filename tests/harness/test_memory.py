"""Peak memory (VmHWM with per-phase reset) and KV bytes of a DynamicCache."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from quantbench.harness.measure import memory


def test_vmhwm_parse_and_reset_with_fake_proc(tmp_path):
    (tmp_path / "status").write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n")
    assert memory.rss_hwm_bytes(tmp_path) == 1234 * 1024
    assert memory.reset_peak(tmp_path) and (tmp_path / "clear_refs").read_text() == "5"
    assert memory.rss_hwm_bytes(tmp_path / "absent") is None
    assert memory.reset_peak(tmp_path / "absent") is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux")
def test_real_peak_tracks_an_allocation_and_resets():
    memory.reset_peak()
    base = memory.peak()["rss_hwm_bytes"]
    # 64 MiB of fresh anonymous pages, each touched: an allocator could serve a tensor from memory
    # it already holds resident (then RSS would not grow); a new mapping always adds to RSS
    size = 64 << 20
    buf = mmap.mmap(-1, size)
    for off in range(0, size, mmap.PAGESIZE):
        buf[off] = 1
    after = memory.peak()["rss_hwm_bytes"]
    assert after - base >= 60 << 20
    buf.close()
    if memory.reset_peak():
        # after a reset the peak is back near the current RSS, below the 64 MiB high-water mark
        assert memory.peak()["rss_hwm_bytes"] < after - (32 << 20)


def test_dynamic_cache_bytes():
    from transformers.cache_utils import DynamicCache

    from quantbench.harness.inputs.models import tiny_llama

    lm = tiny_llama()
    r = memory.measure_kv_bytes_per_token(lm.model, n=12)
    # 2 layers x (K + V) x 2 KV heads x head_dim 64 x 4 bytes
    assert r["bytes_per_token"] == 2 * 2 * 2 * 64 * 4 and r["cache"] == "DynamicCache"
    c = DynamicCache()
    with torch.no_grad():
        lm.model(torch.zeros(1, 5, dtype=torch.long), past_key_values=c, use_cache=True)
    assert memory.dynamic_cache_bytes(c) == 5 * 2048


def test_peak_metric_phases():
    from tests.harness.test_latency import make_ctx

    ctx = make_ctx()
    ctx.memo["peak_quantize"] = {"rss_hwm_bytes": 1 << 40}
    (r,) = memory.peak_memory_bytes(ctx)
    assert r.value == float(1 << 40) and r.protocol["phases"]["quantize"] == 1 << 40
    assert 0 < r.protocol["phases"]["eval"] < 1 << 40


@pytest.mark.parametrize("method,params", [("fp", {}), ("kv-fp16", {}), ("kivi", {"bits": 2, "group_size": 8,
                                                                                   "residual_length": 8})])
def test_kv_bytes_metric_records_the_calculator_beside_the_measurement(method, params):
    from tests.harness.test_latency import make_ctx

    ctx = make_ctx(method, params, latency_p={"context": 48, "prompt_len": 8, "decode_tokens": 2, "batch": 1,
                                              "repeats": 1, "warmup": 0})
    (r,) = memory.kv_bytes_per_token(ctx)
    # deterministic layouts: the real cache's bytes equal the calculator's exactly
    assert r.protocol["prefill_tokens"] == 48
    assert r.value == pytest.approx(r.protocol["calc_bytes_per_token"])
