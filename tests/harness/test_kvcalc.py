"""KV memory calculator: the seed's 42.9 GB and every method's overheads."""

import pytest

from quantbench.methods.kvcalc import LLAMA3_70B, kv_bytes_per_token_for, kv_cache_bytes, llama3_70b_table


def test_llama3_70b_128k_fp16_is_42_9_gb():
    b = kv_cache_bytes("kv-fp16", {}, tokens=131072, **LLAMA3_70B)["total"]
    assert b == 2 * 80 * 8 * 128 * 131072 * 2 == 42_949_672_960
    assert round(b / 1e9, 1) == 42.9 and b / 2**30 == 40.0


def test_method_overheads():
    kw = dict(n_layers=1, n_kv_heads=1, head_dim=128, tokens=1024)
    u = kv_cache_bytes("kv-uniform", {"bits": 4, "group_size": 32}, **kw)
    assert u["codes"] == 2 * 1024 * 64 and u["scales"] == 2 * 1024 * 4 * 4
    kivi = kv_cache_bytes("kivi", {"bits": 2, "group_size": 32, "residual_length": 128}, **kw)
    assert kivi["fp16"] == (1024 - 896) * 128 * 2  # KIVI: all 1024 keys quantized (8 blocks of 128), 896 values
    q = kv_cache_bytes("kvquant", {"bits": 4, "outlier_frac": 0.01, "sink": 1}, **kw)
    assert q["fp16"] == 2 * 128 * 2
    assert q["outliers"] == pytest.approx((1023 * 128 * 0.01 + 1023 * 2) * 6)  # values: max + min
    assert q["scales"] == 1023 * 4 and q["static"] == 2 * 128 * 2 + 2 * 16 * 2


def test_table_orders_methods():
    rows = {f"{r['method']}{r['params'].get('bits', '')}": r for r in llama3_70b_table()}
    assert rows["kv-fp16"]["GB"] == pytest.approx(42.95, abs=0.01)
    assert rows["kvquant2"]["GB"] < rows["kvquant3"]["GB"] < rows["kvquant4"]["GB"] < rows["kv-fp16"]["GB"] / 3
    assert 2 < rows["kvquant2"]["bits_per_element"] < 2.7
    assert kv_bytes_per_token_for("kv-fp16", {}, n_layers=30, n_kv_heads=3, head_dim=64) == 30 * 2 * 3 * 64 * 2
