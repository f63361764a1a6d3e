"""Timings of the ggml block quantizers/dequantizers (numpy, CPU) on one smollm2-sized ffn_down."""

from __future__ import annotations

import numpy as np
import pytest

from quantbench.kernels import ggml

SHAPE = (576, 1536)  # smollm2 ffn_down: the tensor that takes k-quants


@pytest.fixture(scope="module")
def w() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 0.02


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_bench_quantize(benchmark, w: np.ndarray, qtype: str) -> None:  # type: ignore[no-untyped-def]
    q = benchmark(ggml.quantize, w, qtype)
    assert q.shape == (SHAPE[0], ggml.row_bytes(qtype, SHAPE[1]))
    y = ggml.dequantize(q, qtype, SHAPE)
    assert np.sqrt(((y - w) ** 2).mean()) / w.std() < 0.1


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0"])
def test_bench_dequantize(benchmark, w: np.ndarray, qtype: str) -> None:  # type: ignore[no-untyped-def]
    q = ggml.quantize(w, qtype)
    y = benchmark(ggml.dequantize, q, qtype, SHAPE)
    assert y.shape == SHAPE and y.dtype == np.float32
