"""mxfp4 / nvfp4 (weight-only) and mxfp4-a4 / nvfp4-a4 (W4A4): real packed buffers, bits per weight, forwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.harness.inputs.models import tiny_llama
from quantbench.kernels import fp4
from quantbench.methods.base import ConfigError, build_method, get_method, model_storage
from quantbench.methods.microscaling import FP4Linear, MicroscalingConfig

NAMES = ["mxfp4", "nvfp4", "mxfp4-a4", "nvfp4-a4"]


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("name,target", [("mxfp4", "weights"), ("nvfp4", "weights"),
                                         ("mxfp4-a4", "weights+activations"), ("nvfp4-a4", "weights+activations")])
def test_registered_with_what_they_quantize(name, target):
    cls = get_method(name)
    assert cls.name == name and cls.target == target and cls.needs_calibration is False
    assert cls.config_cls is MicroscalingConfig
    assert cls.quantizes("weights") and cls.quantizes("activations") == name.endswith("-a4")
    assert not cls.quantizes("kv")


@pytest.mark.parametrize("name", NAMES)
def test_quantized_model_stores_the_packed_format(name):
    m = tiny_llama().model.eval()
    w = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    q = build_method(name).quantize(m, None)
    layers = [mod for mod in q.modules() if isinstance(mod, FP4Linear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head and embeddings kept
    layer = q.model.layers[0].mlp.down_proj
    out_f, in_f = w.shape
    assert isinstance(layer, FP4Linear) and layer.act_fp4 == name.endswith("-a4")
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (out_f, in_f // 2)
    if name.startswith("mx"):
        assert layer.scale_exp is not None and layer.scale_exp.dtype == torch.uint8
        assert layer.scale_exp.shape == (out_f, in_f // 32) and layer.block_scale is None
        ref = fp4.quantize_mx(w)
        assert torch.equal(layer.qweight, ref.codes) and torch.equal(layer.scale_exp, ref.exponents)
        assert torch.equal(layer.dequantized_weight(), fp4.dequantize_mx(*ref))
    else:
        assert layer.block_scale is not None and layer.block_scale.dtype == torch.float8_e4m3fn
        assert layer.block_scale.shape == (out_f, in_f // 16) and layer.scale_exp is None
        assert layer.tensor_scale is not None and layer.tensor_scale.dtype == torch.float32
        assert layer.tensor_scale.item() == (w.abs().amax() / (448 * 6)).item()
        assert torch.equal(layer.dequantized_weight(), fp4.fake_quantize_nv(w))


@pytest.mark.parametrize("name,bits", [("mxfp4", 4.25), ("nvfp4", 4.5), ("mxfp4-a4", 4.25), ("nvfp4-a4", 4.5)])
def test_bits_per_weight_from_the_real_buffers(name, bits):
    q = build_method(name).quantize(tiny_llama().model.eval(), None)
    tensor_scale_bits = 32 if name.startswith("nv") else 0
    for layer in (mod for mod in q.modules() if isinstance(mod, FP4Linear)):
        s = layer.storage()
        assert s.quantized_weights == layer.in_features * layer.out_features and s.outliers == 0
        assert s.packed_weights * 8 == 4 * s.quantized_weights
        assert (8 * (s.packed_weights + s.scales_zeros) - tensor_scale_bits) / s.quantized_weights == bits
    lin = model_storage(q)["linear"]
    assert (8 * lin.total - 14 * tensor_scale_bits) / lin.quantized_weights == bits
    assert lin.unquantized == 0  # llama's linears have no bias


def test_weight_only_forward_is_the_dequantized_reference_and_keeps_bias_and_dtype():
    lin = nn.Linear(64, 48, bias=True)
    for fmt in ("mxfp4", "nvfp4"):
        q = FP4Linear.from_linear(lin, fmt)
        assert q.storage().unquantized == 48 * 4
        x = torch.randn(2, 3, 64)
        assert torch.equal(q(x), F.linear(x, q.dequantized_weight(), lin.bias))
        qb = FP4Linear.from_linear(nn.Linear(64, 48).bfloat16(), fmt)
        assert qb(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_w4a4_forward_quantizes_each_token_alone(fmt):
    lin = nn.Linear(128, 32, bias=False)
    q = FP4Linear.from_linear(lin, fmt, act_fp4=True)
    x = torch.randn(6, 128) * torch.logspace(-2, 1, 6).unsqueeze(1)  # tokens of very different magnitudes
    if fmt == "mxfp4":
        xq = fp4.fake_quantize_mx(x)
    else:
        xq = fp4.fake_quantize_nv(x, fp4.nv_global_scale(x.abs().amax(-1, keepdim=True)))
    assert torch.equal(q.quantize_input(x), xq)
    y = q(x)
    assert torch.equal(y, F.linear(xq, q.dequantized_weight()))
    for i in range(6):  # batch-invariant: a token's FP4 activation does not depend on the other tokens
        assert torch.equal(q.quantize_input(x[i : i + 1]), xq[i : i + 1])
        torch.testing.assert_close(q(x[i : i + 1]), y[i : i + 1])  # (the GEMM's summation order may differ)


def test_sqnr_weight_only_and_w4a4_on_a_tiny_model_layer():
    m = tiny_llama().model.eval()
    lin = m.model.layers[0].mlp.down_proj.requires_grad_(False)
    # activations shaped like a real MLP output: gated, heavy-tailed
    g = torch.Generator().manual_seed(0)
    x = F.silu(torch.randn(64, lin.in_features, generator=g)) * torch.randn(64, lin.in_features, generator=g)
    ref = lin(x)
    db = {}
    for fmt in ("mxfp4", "nvfp4"):
        w_sqnr = _sqnr_db(lin.weight, FP4Linear.from_linear(lin, fmt).dequantized_weight())
        wo = _sqnr_db(ref, FP4Linear.from_linear(lin, fmt)(x))
        w4a4 = _sqnr_db(ref, FP4Linear.from_linear(lin, fmt, act_fp4=True)(x))
        db[fmt] = (w_sqnr, wo, w4a4)
        print(f"{fmt}: weight SQNR {w_sqnr:.2f} dB, output SQNR weight-only {wo:.2f} dB, W4A4 {w4a4:.2f} dB")
        assert wo > w4a4 > 11.0 and wo > 16.0
    assert db["nvfp4"][0] > db["mxfp4"][0] and db["nvfp4"][2] > db["mxfp4"][2]


@pytest.mark.parametrize("name", NAMES)
def test_whole_model_logits_stay_close(name):
    loaded = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = loaded.model(ids).logits
        q = build_method(name).quantize(loaded.model, None)
        out = q(ids).logits
    db = _sqnr_db(ref, out)
    print(f"{name}: tiny-llama logits SQNR {db:.2f} dB")
    assert torch.isfinite(out).all() and db > (8.0 if name.endswith("-a4") else 11.0)


def test_module_selection_and_config_errors():
    m = build_method("nvfp4", {"include": ["*mlp*"]}).quantize(tiny_llama().model.eval(), None)
    assert isinstance(m.model.layers[0].mlp.up_proj, FP4Linear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    with pytest.raises(ConfigError, match="unknown parameter 'block_size' for mxfp4"):
        build_method("mxfp4", {"block_size": 16})
    with pytest.raises(ConfigError, match="nvfp4-a4: include must be a list of strings"):
        build_method("nvfp4-a4", {"include": "*proj"})
    with pytest.raises(ConfigError, match="exclude must be a list of strings"):
        build_method("mxfp4-a4", {"exclude": [1]})
    with pytest.raises(ConfigError, match=r"mxfp4: in_features must be a multiple of 32.*\b1 \(in_features 48\)"):
        build_method("mxfp4").quantize(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), None)
    # 48 is a multiple of 16: NVFP4 takes the same model
    build_method("nvfp4").quantize(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), None)
    with pytest.raises(ValueError, match="format 'fp8'"):
        FP4Linear(64, 8, "fp8")
