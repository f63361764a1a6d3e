"""fp8 / fp8-weight: what each quantizes, the stored E4M3 layout and its bytes, the FP8 GEMM against the simulated
path, SQNR floors on a tiny llama, and one-line config errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.harness.inputs.models import tiny_llama
from quantbench.kernels import fp8 as fp8k
from quantbench.methods.base import ConfigError, build_method, get_method, iter_linears, model_storage
from quantbench.methods.fp8 import FP8Linear

E4M3 = torch.float8_e4m3fn


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - approx.double()).pow(2).sum()))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama().model.eval()


def _ids(seed=1):
    return torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(seed))


def test_each_name_states_what_it_quantizes():
    assert get_method("fp8").target == "weights+activations"
    assert get_method("fp8").quantizes("weights") and get_method("fp8").quantizes("activations")
    assert get_method("fp8-weight").quantizes("weights") and not get_method("fp8-weight").quantizes("activations")
    assert not get_method("fp8").needs_calibration
    assert build_method("fp8").config.to_dict() == {"activations": "dynamic", "weight_scale": "channel",
                                                    "include": ("*",), "exclude": build_method("fp8").config.exclude,
                                                    "version": 1}
    assert build_method("fp8-weight").config.activations == "none"


@pytest.mark.parametrize("name, params, message", [
    ("fp8", {"activations": "none"}, "fp8: activations='none' is weight-only FP8: use the method 'fp8-weight'"),
    ("fp8-weight", {"activations": "dynamic"}, "fp8-weight: activations='dynamic' quantizes activations: use the "
                                               "method 'fp8'"),
    ("fp8", {"activations": "static"}, "fp8: activations must be one of ['dynamic', 'none'], got 'static'"),
    ("fp8", {"weight_scale": "group"}, "fp8: weight_scale must be one of ['channel', 'tensor'], got 'group'"),
    ("fp8-weight", {"weight_scale": 1}, "fp8-weight: weight_scale must be one of"),
    ("fp8", {"bits": 8}, "unknown parameter 'bits' for fp8"),
])
def test_bad_parameters_are_config_errors(name, params, message):
    with pytest.raises(ConfigError) as e:
        build_method(name, params)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_direct_construction_is_validated_too():
    cls = get_method("fp8").config_cls
    with pytest.raises(ConfigError, match="fp8: activations='bogus' is not valid"):
        cls(activations="bogus")  # type: ignore[call-arg]


@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
def test_layer_stores_e4m3_codes_and_fp32_scales(weight_scale):
    lin = nn.Linear(96, 40, bias=True)
    q = FP8Linear.from_linear(lin, "dynamic", weight_scale)
    assert q.qweight.dtype == E4M3 and q.qweight.shape == (40, 96) and q.qweight.element_size() == 1
    assert q.weight_scale.dtype == torch.float32
    assert q.weight_scale.shape == ((40,) if weight_scale == "channel" else ())
    w = lin.weight.detach()
    amax = w.abs().amax(1) if weight_scale == "channel" else w.abs().amax()
    assert torch.equal(q.weight_scale, amax / 448.0)
    assert torch.equal(q.dequantized_weight(), q.qweight.float() * q.weight_scale.reshape(-1, 1))
    assert torch.equal(q.bias, lin.bias.detach())
    st = q.storage()
    n_scales = 40 if weight_scale == "channel" else 1
    assert (st.packed_weights, st.scales_zeros, st.unquantized, st.quantized_weights) == (96 * 40, 4 * n_scales,
                                                                                          4 * 40, 96 * 40)
    bits = 8 * (st.packed_weights + st.scales_zeros) / st.quantized_weights
    assert bits == 8 + 32 * n_scales / (96 * 40)  # 8 + 32 / in_features with channel scales


def test_model_is_quantized_with_real_fp8_buffers(llama):
    m = copy.deepcopy(llama)
    linears = [n for n, _ in iter_linears(m)]
    method = build_method("fp8")
    q = method.quantize(m, None)
    assert method.artifacts["quantized_modules"] == len(linears) == 14
    assert all(isinstance(q.get_submodule(n), FP8Linear) for n in linears)
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, FP8Linear)
    lin = model_storage(q)["linear"]
    assert lin.packed_weights == lin.quantized_weights  # one byte per weight
    assert lin.scales_zeros == 4 * sum(q.get_submodule(n).out_features for n in linears)
    assert lin.unquantized == 0  # llama's linears have no bias


@pytest.mark.parametrize("name, params, layer_floor, logit_floor", [
    ("fp8", {}, 28.0, 20.0),
    ("fp8", {"weight_scale": "tensor"}, 27.0, 20.0),
    ("fp8-weight", {}, 30.0, 22.0),
])
def test_layer_outputs_and_logits_keep_sqnr(llama, name, params, layer_floor, logit_floor):
    m = copy.deepcopy(llama)
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args, out):
            inputs[name] = args[0].detach()
        return hook

    hooks = [mod.register_forward_hook(record(n)) for n, mod in iter_linears(m)]
    with torch.no_grad():
        ref = m(_ids()).logits
    for h in hooks:
        h.remove()
    fp_layers = {n: copy.deepcopy(mod) for n, mod in iter_linears(m)}
    q = build_method(name, params).quantize(m, None)
    with torch.no_grad():
        for n, fp_lin in fp_layers.items():  # each layer on its own fp32 input
            assert _sqnr_db(fp_lin(inputs[n]), q.get_submodule(n)(inputs[n])) > layer_floor, n
        out = q(_ids()).logits
    assert _sqnr_db(ref, out) > logit_floor


def test_packed_gemm_agrees_with_the_simulated_path(llama):
    q = build_method("fp8").quantize(copy.deepcopy(llama), None)
    layer = q.model.layers[0].mlp.down_proj
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed = layer(x)
        layer.packed = False
        simulated = layer(x)
    assert packed.shape == (2, 7, layer.out_features)
    xq, xs = fp8k.quantize_e4m3(x.reshape(-1, layer.in_features))
    expected = F.linear(fp8k.dequantize_e4m3(xq, xs), layer.dequantized_weight()).reshape(2, 7, -1)
    assert torch.equal(simulated, expected)  # activations per token, E4M3, then fp32
    assert _sqnr_db(simulated, packed) > 100.0  # scaled_mm (or the exact reference) vs fp32: rounding only
    ref = fp8k.fp8_matmul_reference(xq, xs, layer.qweight, layer.weight_scale).reshape(2, 7, -1)
    assert _sqnr_db(ref, packed) > 100.0


def test_weight_only_leaves_activations_alone():
    lin = nn.Linear(64, 32, bias=True)
    q = FP8Linear.from_linear(lin, "none")
    x = torch.randn(5, 64)
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight(), lin.bias.detach()))


def test_low_precision_activations_keep_their_dtype():
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(3, 4, 64)
    for activations in ("dynamic", "none"):
        q = FP8Linear.from_linear(lin, activations)
        y = q(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (3, 4, 32)
        assert _sqnr_db(q(x), y.float()) > 30.0
