"""Quantized modules land on their weight's device, and no step makes a tensor on torch's default device.

With the default device set to ``meta``, a tensor created without ``device=`` lands on meta and the first op
mixing it with the (CPU) model raises, or leaves meta buffers behind: the CPU stand-in for a model loaded on a
GPU while torch's default device stays the CPU.
"""

from __future__ import annotations

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.base import Calibration, build_method

CASES = [
    ("rtn", {"bits": 8, "group_size": -1}),
    ("rtn", {"bits": 4, "group_size": 32}),
    ("hqq", {"bits": 4, "group_size": 32}),
    ("gptq", {"bits": 4, "group_size": 32}),
    ("awq", {"bits": 4, "group_size": 32}),
    ("w8a8", {}),
    ("smoothquant", {}),
    ("fp8", {}),
    ("llm-int8", {}),
    ("mxfp4", {}),
    ("nvfp4-a4", {}),
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_quantize_and_forward_make_nothing_on_the_default_device(name: str, params: dict) -> None:
    model = tiny_llama().model
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    calib = Calibration(torch.randint(0, vocab, (4, 32), generator=g, device="cpu"), "random", 0)
    ids = torch.randint(0, vocab, (1, 16), generator=g, device="cpu")
    with torch.no_grad():
        ref = model(ids).logits
    method = build_method(name, params)
    with torch.device("meta"), torch.no_grad():
        q = method.quantize(model, calib)
        out = q(ids).logits
    bad = [n for n, t in [*q.named_parameters(), *q.named_buffers()] if t.device.type != "cpu"]
    assert not bad, f"{name}: tensors off the model's device: {bad[:5]}"
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    assert out.shape == ref.shape
