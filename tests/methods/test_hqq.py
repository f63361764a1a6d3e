"""hqq: the shrinkage operator, the half-quadratic zero solver against hand numbers and against RTN,
the fp16 scale + fp16 zero packed layout (storage, int4pack CPU path vs the dequantized reference)."""

import sys

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama, tiny_opt
from quantbench.kernels import intmm
from quantbench.methods.base import METHODS, ConfigError, build_method, get_method, model_storage
from quantbench.methods.hqq import HQQ, HQQConfig, HQQLinear, hqq_quantize_weight, lp_error, shrink_lp
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.rtn import rtn_quantize_weight


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def _rtn_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    codes, scales, zeros = rtn_quantize_weight(w, bits, group_size, sym=False)
    return IntQuantLinear.from_codes(codes, scales, zeros, bits, group_size).dequantized_weight()


def _hqq_weight(w: torch.Tensor, bits: int, group_size: int, **kw) -> torch.Tensor:
    r = hqq_quantize_weight(w, bits, group_size, **kw)
    return HQQLinear.from_codes(r.codes, r.scales, r.zeros, bits, group_size).dequantized_weight()


# --------------------------------------------------------------------------- the operator


def test_shrink_lp_matches_its_formula_on_hand_values():
    x = torch.tensor([0.5, -0.5, 0.1, 0.0, 2.0])
    # sign(x) relu(|x| - |x|^(p-1) / beta), p = 0.7, beta = 10: 0.5^-0.3 = 1.231144, 2^-0.3 = 0.812252,
    # 0.1^-0.3 = 1.995262 (> 0.1 * 10: shrunk to 0), and 0 stays 0
    assert shrink_lp(x, 10.0, 0.7).tolist() == pytest.approx([0.3768856, -0.3768856, 0.0, 0.0, 1.9187748], abs=1e-6)
    # p = 1 is plain soft-thresholding at 1 / beta
    assert shrink_lp(x, 4.0, 1.0).tolist() == pytest.approx([0.25, -0.25, 0.0, 0.0, 1.75], abs=1e-7)
    # a larger beta shrinks less (beta -> inf: the identity)
    assert shrink_lp(x, 1e9, 0.7).tolist() == pytest.approx(x.tolist(), abs=1e-6)


# --------------------------------------------------------------------------- the solver on a hand group

# one group of 8 weights, a cluster in [0, 0.6] and an outlier at 3: the min-max grid at 2 bits is s = 1, z = 0
HAND = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 3.0]])


def test_hand_group_min_max_init_is_rtn():
    codes, scales, zeros = rtn_quantize_weight(HAND, 2, 8, sym=False)
    assert scales.item() == 1.0 and zeros.item() == 0.0 and codes.tolist() == [[0, 0, 0, 0, 0, 0, 1, 3]]
    r = hqq_quantize_weight(HAND, 2, 8, iters=0)  # no iteration: exactly rtn's grid
    assert torch.equal(r.codes, codes) and r.scales.item() == 1.0 and r.zeros.item() == 0.0
    # errors [0, .1, .2, .3, .4, .5, -.4, 0]: mean |e|^0.7 = (0.199526 + 0.324131 + 0.430512 + 2 * 0.526510
    # + 0.615572) / 8
    assert r.lp_init == r.lp_final == pytest.approx(0.327846, abs=1e-5)


def test_hand_group_first_half_quadratic_step():
    r = hqq_quantize_weight(HAND, 2, 8, iters=1)
    # W_e = shrink(e, beta=10) of e = [0, .1, .2, .3, .4, .5, -.4, 0]: [0, 0, .037934, .156496, .268362,
    # .376886, -.268362, 0]; z = mean(q - (w - W_e)) = (-1.1 + 0.571316) / 8 = -0.066085
    e = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, -0.4, 0.0])
    w_e = shrink_lp(e, 10.0, 0.7)
    assert w_e.tolist() == pytest.approx([0, 0, 0.037934, 0.156496, 0.268362, 0.376886, -0.268362, 0], abs=1e-5)
    assert r.zeros.item() == pytest.approx(-0.066085, abs=1e-4)  # moved off the integer grid, stored fp16
    assert r.zeros.item() == torch.tensor(-0.066085).half().item()
    assert r.codes.tolist() == [[0, 0, 0, 0, 0, 0, 1, 3]]  # 0.6 + 0.066 still rounds to 1
    assert r.lp_final == pytest.approx(0.325771, abs=1e-4) and r.lp_final < r.lp_init


def test_hand_group_solver_beats_rtn_in_lp():
    r = hqq_quantize_weight(HAND, 2, 8)  # paper defaults: p 0.7, beta 10, kappa 1.01, 20 iterations
    # the zero slides to about -0.2: the cluster is reconstructed at 0.203 (0.6 joins it) and the
    # outlier at 3.203, one larger error traded for seven smaller ones under |.|^0.7
    assert r.zeros.item() == pytest.approx(-0.2032, abs=1e-3) and r.scales.item() == 1.0
    assert r.codes.tolist() == [[0, 0, 0, 0, 0, 0, 0, 3]]
    w_hat = r.scales * (r.codes - r.zeros)
    assert lp_error(HAND, w_hat, 0.7) == pytest.approx(r.lp_final, rel=1e-5)
    assert r.lp_final == pytest.approx(0.29300, abs=1e-4)
    codes, scales, zeros = rtn_quantize_weight(HAND, 2, 8, sym=False)
    lp_rtn = lp_error(HAND, scales * (codes - zeros), 0.7)
    assert lp_rtn == pytest.approx(0.327846, abs=1e-5) and r.lp_final < lp_rtn
    assert 1 < r.iters_run < 20  # stopped early once the error stopped decreasing


# --------------------------------------------------------------------------- against rtn on a tiny model


@pytest.mark.parametrize("bits,rtn_lp,hqq_lp,rtn_db,hqq_db", [
    (4, 0.01038, 0.01000, 20.82, 21.17),
    (3, 0.01769, 0.01702, 14.21, 14.57),
])
def test_hqq_beats_rtn_on_a_tiny_llama_layer(bits, rtn_lp, hqq_lp, rtn_db, hqq_db):
    w = tiny_llama().model.model.layers[0].mlp.down_proj.weight.detach().clone()
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(1))
    w_rtn, w_hqq = _rtn_weight(w, bits, 64), _hqq_weight(w, bits, 64)
    lp_rtn, lp_hqq = lp_error(w, w_rtn, 0.7), lp_error(w, w_hqq, 0.7)
    assert lp_rtn == pytest.approx(rtn_lp, abs=1e-4) and lp_hqq == pytest.approx(hqq_lp, abs=1e-4)
    assert lp_hqq < 0.97 * lp_rtn
    assert _sqnr_db(w, w_rtn) == pytest.approx(rtn_db, abs=0.05)
    assert _sqnr_db(w, w_hqq) == pytest.approx(hqq_db, abs=0.05)
    assert _sqnr_db(w, w_hqq) > _sqnr_db(w, w_rtn) + 0.25  # l_p-optimal zeros are better in L2 too, here
    y = x @ w.t()
    assert _sqnr_db(y, x @ w_hqq.t()) > _sqnr_db(y, x @ w_rtn.t()) + 0.25  # and in the layer's output


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 96, -1])
def test_never_worse_than_the_min_max_init_per_group(bits, group_size):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    w[3, 10] = 0.3  # an outlier
    r = hqq_quantize_weight(w, bits, group_size)
    assert r.lp_final <= r.lp_init
    gs = 256 if group_size == -1 else group_size
    q = HQQLinear.from_codes(r.codes, r.scales, r.zeros, bits, group_size)
    w_hqq, w_rtn = q.dequantized_weight(), _rtn_weight(w, bits, group_size)
    assert lp_error(w, w_hqq, 0.7) == pytest.approx(r.lp_final, rel=1e-4)
    for g0 in range(0, 256, gs):  # each group (96: a short last one) keeps its best iterate
        sl = slice(g0, g0 + gs)
        err_h = (w[:, sl] - w_hqq[:, sl]).abs().pow(0.7).sum(1)
        err_r = (w[:, sl] - w_rtn[:, sl]).abs().pow(0.7).sum(1)
        assert (err_h <= err_r * (1 + 1e-5)).all()


def test_opt_scale_also_moves_the_scale_and_lowers_the_error():
    w = tiny_llama().model.model.layers[0].mlp.down_proj.weight.detach().clone()
    zero_only = hqq_quantize_weight(w, 3, 64)
    both = hqq_quantize_weight(w, 3, 64, opt_scale=True)
    s_rtn = rtn_quantize_weight(w, 3, 64, sym=False)[1]
    assert torch.equal(zero_only.scales, s_rtn) and not torch.equal(both.scales, s_rtn)
    assert both.lp_final < zero_only.lp_final < zero_only.lp_init


def test_model_logits_closer_than_rtn():
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        ref = tiny_llama().model(x).logits
        for name in ("rtn", "hqq"):
            q = build_method(name, {"bits": 3, "group_size": 64}).quantize(tiny_llama().model, None)
            out[name] = _sqnr_db(ref, q(x).logits)
    assert out["hqq"] > out["rtn"] + 0.3


# --------------------------------------------------------------------------- the packed layout


def test_storage_is_packed_codes_plus_fp16_scale_and_zero_per_group():
    lm = tiny_opt()  # biased linears
    n_bias = sum(mod.bias.numel() for name, mod in lm.model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and "lm_head" not in name)
    method = build_method("hqq", {"bits": 3, "group_size": 64})
    m = method.quantize(lm.model, None)
    layers = [mod for mod in m.modules() if isinstance(mod, HQQLinear)]
    assert layers and method.artifacts["quantized_modules"] == len(layers)
    assert method.artifacts["lp_error"] < method.artifacts["lp_error_init"]
    lin = model_storage(m)["linear"]
    n = lin.quantized_weights
    assert n == sum(mod.in_features * mod.out_features for mod in layers)
    assert lin.packed_weights == 3 * n // 8
    assert lin.scales_zeros == (n // 64) * (2 + 2)  # an fp16 scale and an fp16 zero per group
    assert lin.unquantized == 4 * n_bias  # fp32 biases
    assert lin.total == 3 * n // 8 + 4 * (n // 64) + 4 * n_bias
    assert 8 * (lin.packed_weights + lin.scales_zeros) / n == pytest.approx(3 + 32 / 64)
    layer = layers[0]
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == layer.zeros.dtype == torch.float16


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4pack_path_matches_the_dequantized_reference(bits, group_size):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    bias = torch.randn(48, generator=torch.Generator().manual_seed(3)) * 0.1
    r = hqq_quantize_weight(w, bits, group_size)
    layer = HQQLinear.from_codes(r.codes, r.scales, r.zeros, bits, group_size, bias=bias)
    # the stored buffers are the solver's numbers
    assert torch.equal(layer.codes().t(), r.codes)
    assert torch.equal(layer.zeros.float().t(), r.zeros) and torch.equal(layer.scales.float().t(), r.scales)
    assert layer.int4pack() is not None
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(4))
    ref = torch.nn.functional.linear(x, layer.dequantized_weight(), bias)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    assert _sqnr_db(ref, y) > 40.0  # bf16 activations and (s, z) pairs
    layer.packed = False
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_shapes_the_op_cannot_run_take_the_reference():
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(5)) * 0.02  # out % 16 != 0
    r = hqq_quantize_weight(w, 4, 64)
    layer = HQQLinear.from_codes(r.codes, r.scales, r.zeros, 4, 64)
    assert layer.int4pack() is None
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().t(), atol=1e-6)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(7)) * 0.02  # group 48: no op group divides it
    r = hqq_quantize_weight(w, 4, 48)
    layer = HQQLinear.from_codes(r.codes, r.scales, r.zeros, 4, 48)
    assert layer.int4pack() is None and layer.scales.shape == (6, 32)  # 5 groups of 48 and one of 16
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().t(), atol=1e-6)


def test_fast_path_switch_and_cache_follow_the_buffers(monkeypatch):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(8)) * 0.02
    r = hqq_quantize_weight(w, 4, 64)
    layer = HQQLinear.from_codes(r.codes, r.scales, r.zeros, 4, 64)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(9))
    first = layer.int4pack()
    assert first is not None and layer.int4pack() is first  # cached
    layer.zeros.add_(1.0)  # an edited buffer rebuilds the op's weight
    assert layer.int4pack() is not first
    assert _sqnr_db(x @ layer.dequantized_weight().t(), layer(x)) > 40.0
    monkeypatch.setattr(intmm, "CPU_FAST_PATH", False)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().t(), atol=1e-6)


# --------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize("params,message", [
    ({"bits": 8}, "hqq: bits must be 2, 3 or 4, got 8"),
    ({"group_size": 0}, "hqq: group_size must be in 1..1048576 or -1 (per channel), got 0"),
    ({"p": 1.5}, "hqq: p must be in (0, 1], got 1.5"),
    ({"p": 0}, "hqq: p must be in (0, 1], got 0"),
    ({"iters": -1}, "hqq: iters must be in 0..10000, got -1"),
    ({"beta": 0.0}, "hqq: beta must be a positive number, got 0.0"),
    ({"kappa": 0.9}, "hqq: kappa must be in [1, 10], got 0.9"),
    ({"opt_scale": 1}, "hqq: opt_scale must be true or false, got 1"),
    ({"bits": 4.0}, "hqq: bits must be an integer, got 4.0"),
])
def test_config_errors(params, message):
    with pytest.raises(ConfigError) as e:
        build_method("hqq", params)
    assert str(e.value) == message


def test_registered_with_the_paper_defaults():
    assert "hqq" in METHODS.names() and get_method("hqq") is HQQ
    assert HQQ.needs_calibration is False and HQQ.quantizes("weights") and not HQQ.quantizes("kv")
    assert "(Badri & Shaji, 2023)" in sys.modules[HQQ.__module__].__doc__.splitlines()[0]  # what `quantbench ls` shows
    c = build_method("hqq").config
    assert c == HQQConfig(bits=4, group_size=64, p=0.7, iters=20, beta=10.0, kappa=1.01, opt_scale=False)
    assert list(c.to_dict()) == ["bits", "group_size", "p", "iters", "beta", "kappa", "opt_scale", "include",
                                 "exclude", "version"]
