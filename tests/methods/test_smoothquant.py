"""SmoothQuant / W8A8: folding invariance, smoothing math, real-vs-simulated int8 paths, SQNR floors."""

import copy

import pytest
import torch
from torch import nn

from quantbench.harness.inputs.models import tiny_llama, tiny_opt
from quantbench.methods.base import Calibration, ConfigError, build_method, model_storage
from quantbench.methods.smoothquant import (
    calibrate_act_stats,
    find_smooth_groups,
    fold_smoothing,
    outlier_ratio,
    outlier_table,
    plot_outliers,
    smoothing_factors,
)
from quantbench.methods.w8a8_linear import W8A8Linear

MODELS = {"llama": tiny_llama, "opt": tiny_opt}


@pytest.fixture(scope="module")
def models():
    return {k: f().model for k, f in MODELS.items()}


def calib(n=2, seq=48, seed=0):
    return Calibration(torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed)), "rand", seed)


def ids(seed=1):
    return torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(seed))


def sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def plant_outliers(model, channels=(3, 17, 42), gain=40.0):
    """Scale a few hidden channels of every norm weight: persistent activation outlier channels."""
    with torch.no_grad():
        for g in find_smooth_groups(model):
            norm = model.get_submodule(g.norm_name)
            norm.weight[list(channels)] *= gain
            if getattr(norm, "bias", None) is not None:
                norm.bias[list(channels)] *= gain


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folding_leaves_fp_outputs_unchanged(models, arch, alpha):
    model = copy.deepcopy(models[arch])
    plant_outliers(model)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    stats = calibrate_act_stats(model, calib(), names)
    groups = find_smooth_groups(model)
    assert len(groups) == 4 and {g.group for g in groups} == ({"qkv", "gate_up"} if arch == "llama" else {"qkv", "fc1"})
    for g in groups:
        fcs = [model.get_submodule(n) for n in g.fc_names]
        s = smoothing_factors(stats[g.fc_names[0]].input_absmax, fcs, alpha)
        assert s.std() > 0  # a real, non-trivial rescaling
        fold_smoothing(model.get_submodule(g.norm_name), fcs, s)
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_smoothing_factor_formula():
    fcs = [nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)]
    with torch.no_grad():
        fcs[0].weight.copy_(torch.tensor([[1.0, -2, 0, 4], [0.5, 1, 0, 1], [0, 0, 0, 0]]))
        fcs[1].weight.copy_(torch.tensor([[2.0, 0, 0, -8], [0, 1, 0, 0]]))
    act = torch.tensor([16.0, 1.0, 4.0, 0.0])
    s = smoothing_factors(act, fcs, 0.5)
    # max|W_j| over BOTH linears: [2, 2, 0 -> 1e-5, 8]; act 0 -> s clamped to 1e-5
    expected = torch.tensor([4 / 2**0.5, 1 / 2**0.5, 2 / 1e-5**0.5, 1e-5])
    torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_smoothing_reduces_planted_outliers(models, arch):
    model = copy.deepcopy(models[arch])
    plant_outliers(model)
    m = build_method("smoothquant", {"alpha": 0.5})
    m.quantize(model, calib())
    rows = m.artifacts["outliers"]
    assert len(rows) == 4
    for r in rows:
        assert r["before"] > 20  # the planted channels dominate
        assert r["after"] < r["before"] / 4, r
    # alpha=0.5 roughly takes the square root of the activation outlier ratio
    assert all(r["after"] < 2 * r["before"] ** 0.5 + 2 for r in rows)
    df = outlier_table(m.artifacts)
    assert list(df.columns) == ["layer", "group", "before", "after", "w_before", "w_after", "reduction"]
    assert (df["reduction"] > 4).all()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_extremes_move_all_or_nothing(models, alpha):
    """alpha = 1: s = max|X_j|, every smoothed activation channel's absmax is 1 (ratio 1); alpha = 0:
    s = 1 / max|W_j|, every weight column's absmax becomes 1 (weight ratio 1), activations take the rest."""
    model = copy.deepcopy(models["llama"])
    plant_outliers(model)
    m = build_method("smoothquant", {"alpha": alpha})
    m.quantize(model, calib())
    rows = m.artifacts["outliers"]
    assert len(rows) == 4
    for r in rows:
        assert r["before"] > 20
        if alpha == 1.0:
            assert r["after"] == pytest.approx(1.0, rel=1e-5) and r["w_after"] > r["w_before"], r
        else:
            assert r["w_after"] == pytest.approx(1.0, rel=1e-5) and r["after"] > 1.0, r


def test_w8a8_records_unsmoothed_ratios(models):
    model = copy.deepcopy(models["llama"])
    plant_outliers(model)
    m = build_method("w8a8", {})
    m.quantize(model, calib())
    for r in m.artifacts["outliers"]:
        assert r["after"] == r["before"] > 20 and r["w_after"] == r["w_before"] > 1


def test_plot_outliers(tmp_path):
    df = outlier_table({"outliers": [{"layer": "l0", "group": "qkv", "before": 30.0, "after": 5.0},
                                     {"layer": "l1", "group": "qkv", "before": 50.0, "after": 6.0}]})
    paths = plot_outliers(df, tmp_path / "outliers")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("params", [{}, {"act_scheme": "per_tensor_static", "quantize_bmm_input": True}])
def test_packed_and_simulated_paths_agree(models, arch, params):
    model = build_method("smoothquant", params).quantize(copy.deepcopy(models[arch]), calib())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    assert len(layers) == (12 if arch == "opt" else 14)
    inputs = {}

    def keep(name):
        def hook(mod, args, y):
            inputs[name] = (args[0].detach(), y.detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    x = ids()
    with torch.no_grad():
        packed = model(x).logits
        for h in hooks:
            h.remove()
        # layer by layer, on the same inputs: the same integer products, only fp32 summation order differs
        # (before the optional output fake-quant, where a last-bit difference may flip a tie)
        n_out_q = sum(m.quantize_output for m in layers.values())
        assert n_out_q == (2 * 3 if params.get("quantize_bmm_input") else 0)
        for n, m in layers.items():
            a, _ = inputs[n]
            m.quantize_output, out_q = False, m.quantize_output
            y_packed = m(a)
            m.packed = False
            y_sim = m(a)
            m.quantize_output = out_q
            torch.testing.assert_close(y_packed, y_sim, rtol=1e-5, atol=1e-5 * y_sim.abs().max().item())
        simulated = model(x).logits
    # through the whole model a last-bit difference can flip a later activation's rounding: close, not equal
    assert sqnr(simulated, packed) > 35


@pytest.mark.parametrize("arch", list(MODELS))
def test_sqnr_floor_and_storage(models, arch):
    base = models[arch]
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
    res = {}
    for name, params in [("w8a8", {}), ("smoothquant", {"alpha": 0.5}),
                         ("smoothquant", {"alpha": 0.5, "act_scheme": "per_tensor_static"})]:
        q = build_method(name, params).quantize(copy.deepcopy(base), calib())
        with torch.no_grad():
            res[(name, params.get("act_scheme", "per_token"))] = sqnr(ref, q(x).logits)
    assert min(res.values()) > 25, res
    st = model_storage(q)["linear"]
    assert st.packed_weights == st.quantized_weights  # one int8 byte per weight
    assert st.scales_zeros == 4 * sum(m.out_features + 1 for m in q.modules() if isinstance(m, W8A8Linear))


def test_planted_outliers_smoothquant_beats_naive(models):
    base = copy.deepcopy(models["llama"])
    plant_outliers(base, gain=60.0)
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
    out = {}
    for name, p in [("w8a8", {"act_scheme": "per_tensor_static"}),
                    ("smoothquant", {"alpha": 0.5, "act_scheme": "per_tensor_static"})]:
        q = build_method(name, p).quantize(copy.deepcopy(base), calib())
        with torch.no_grad():
            out[name] = sqnr(ref, q(x).logits)
    assert out["smoothquant"] > out["w8a8"] + 3, out


def test_config_validation():
    with pytest.raises(ConfigError, match="alpha"):
        build_method("smoothquant", {"alpha": 1.5})
    with pytest.raises(ConfigError, match="act_scheme"):
        build_method("w8a8", {"act_scheme": "per_channel"})
    with pytest.raises(ConfigError, match="unknown parameter 'alpha'"):
        build_method("w8a8", {"alpha": 0.5})
    assert build_method("smoothquant").config.alpha == 0.5


def test_outlier_ratio():
    assert outlier_ratio(torch.tensor([1.0, 1.0, 2.0, 10.0, 1.0])) == 10.0


def test_w8a8_and_smoothquant_share_one_calibration_pass(monkeypatch):
    """Cells of a run holding the same Calibration and fp weights capture the activation statistics once;
    the result equals a fresh capture, and smoothing one cell's copy leaves the other's untouched."""
    from quantbench.methods import smoothquant as sq

    lm = tiny_llama(seed=3)
    calib = Calibration(torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0)), "rand", 0)
    calls = []
    real = sq._capture_act_stats
    monkeypatch.setattr(sq, "_capture_act_stats", lambda *a: calls.append(1) or real(*a))
    a = build_method("w8a8", {}).quantize(copy.deepcopy(lm.model), calib)
    b = build_method("smoothquant", {"alpha": 0.5}).quantize(copy.deepcopy(lm.model), calib)
    assert len(calls) == 1
    fresh = build_method("smoothquant", {"alpha": 0.5}).quantize(
        copy.deepcopy(lm.model), Calibration(calib.tokens, "rand", 0))
    assert len(calls) == 2  # a new Calibration captures again
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(b(x).logits, fresh(x).logits)
        assert a(x).logits.shape == b(x).logits.shape
    # a different model (different weights) is captured again
    other = tiny_llama(seed=4)
    build_method("w8a8", {}).quantize(copy.deepcopy(other.model), calib)
    assert len(calls) == 3


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_calibration_pass_without_full_logits_records_the_same_statistics(models, arch, monkeypatch):
    """The statistics pass runs the model with logits_to_keep=1 (forward_for_hooks): every hooked linear's input
    and output absmax equal a full forward's bit for bit, and a model whose forward has no logits_to_keep still
    runs (all positions)."""
    from quantbench.methods import placement, smoothquant

    model = models[arch]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    cal = calib(3, 40, seed=5)
    calls = []

    def spy(m, x):
        calls.append(x.shape)
        return placement.forward_for_hooks(m, x)

    monkeypatch.setattr(smoothquant, "forward_for_hooks", spy)
    fast = smoothquant._capture_act_stats(model, cal, names)
    assert len(calls) == 3
    monkeypatch.setattr(smoothquant, "forward_for_hooks", lambda m, x: m(x))
    full = smoothquant._capture_act_stats(model, cal, names)
    for n in names:
        assert torch.equal(fast[n].input_absmax, full[n].input_absmax) and torch.equal(fast[n].output_absmax,
                                                                                        full[n].output_absmax)
    ids = cal.tokens[0].unsqueeze(0)
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    try:
        placement.forward_for_hooks(model, ids)
    finally:
        h.remove()
    assert seen == [1]  # the projection ran on the last position only

    class NoKeep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids)

    placement.forward_for_hooks(NoKeep(), ids)  # falls back to the plain call
