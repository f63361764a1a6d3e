"""absmax: symmetric per-channel codes against the formula, the packed layout, and the packed kernel path."""

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.absmax import absmax_quantize_weight
from quantbench.methods.base import ConfigError, build_method, model_storage
from quantbench.methods.qlinear import IntQuantLinear


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_follow_the_absmax_formula(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[3, 7] = 0.0
    codes, scale = absmax_quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    expected_scale = (w.abs().amax(1, keepdim=True) / qmax).half().float()
    assert torch.equal(scale, expected_scale)
    assert torch.equal(codes, torch.clamp(torch.round(w / expected_scale), -qmax, qmax).to(torch.int32))
    assert codes.min() >= -qmax and codes.max() <= qmax
    assert codes[3, 7] == 0  # zero is on the grid
    assert ((w - codes * scale).abs() <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits,floor_db", [(8, 38.0), (4, 14.0)])
def test_quantized_model_stores_packed_codes_and_keeps_sqnr(bits, floor_db):
    m = tiny_llama().model.eval()
    w = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    q = build_method("absmax", {"bits": bits}).quantize(m, None)
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, IntQuantLinear) and layer.bits == bits and layer.scales.shape[0] == 1
    codes, scale = absmax_quantize_weight(w, bits)
    assert torch.equal(layer.dequantized_weight(), codes.float() * scale)  # stored = formula
    assert _sqnr_db(w, layer.dequantized_weight()) > floor_db
    # the packed kernel path (int8pack / int4pack on CPU) against the dequantized reference
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    ref = x @ layer.dequantized_weight().t()
    assert _sqnr_db(ref, layer(x)) > 40.0
    # storage: packed codes at `bits` per weight plus one fp16 scale and one packed zero per channel
    lin = model_storage(q)["linear"]
    assert lin.packed_weights * 8 == bits * lin.quantized_weights


def test_bad_bits_is_a_config_error():
    with pytest.raises(ConfigError, match="absmax: bits must be 2, 4 or 8"):
        build_method("absmax", {"bits": 3})
