"""Tensors follow the weights / data they meet, never torch's default device.

With the default device set to ``meta``, anything built without an explicit device lands on meta and the
first op mixing it with the (CPU) inputs raises; results must equal the ones built normally (bit for bit).
"""

import torch
from torch import nn

from quantbench.kernels.hadamard import random_hadamard_matrix
from quantbench.kernels.kvcache import KVSpec, qdq_sequence, weighted_kmeans_1d
from quantbench.methods import bitnet as B
from quantbench.methods import sensitivity as S


def _on_meta(fn):
    torch.set_default_device("meta")
    try:
        return fn()
    finally:
        torch.set_default_device(None)


def _lin(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 32)


def test_ternary_module_built_on_its_weight_device():
    lin, x = _lin(), torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = B.to_packed(lin, "ternary", "2bit", "tensor", 128, 8)
    got = _on_meta(lambda: B.to_packed(lin, "ternary", "2bit", "tensor", 128, 8))
    assert {t.device.type for t in got.buffers()} == {"cpu"}
    assert torch.equal(got(x), ref(x))
    bl = _on_meta(lambda: B.BitLinear.from_linear(lin, norm="rms"))
    assert {p.device.type for p in bl.parameters()} == {"cpu"} and torch.equal(bl.weight, lin.weight)


def test_kv_qdq_and_kmeans_ignore_default_device():
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(2))
    for spec in (KVSpec("int", "token", 4, 16), KVSpec("int", "channel", 2, 8, span_group=8)):
        assert torch.equal(_on_meta(lambda spec=spec: qdq_sequence(x, spec)), qdq_sequence(x, spec))
    pts = x.flatten()
    assert torch.equal(_on_meta(lambda: weighted_kmeans_1d(pts, None, 4)), weighted_kmeans_1d(pts, None, 4))


def test_hadamard_and_rtn_fake_quant_on_cpu():
    assert torch.equal(_on_meta(lambda: random_hadamard_matrix(12, 3)), random_hadamard_matrix(12, 3))
    w = _lin().weight.data
    assert torch.equal(_on_meta(lambda: S.rtn_fake_quantize(w, 3, 32)), S.rtn_fake_quantize(w, 3, 32))

