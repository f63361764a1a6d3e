"""The one quantization path (quantize), per-module plans for GPTQ/RTN, the module-selection mixin, fingerprints."""

import copy
import dataclasses
import hashlib

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods import base
from quantbench.methods.base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    build_method,
    model_fingerprint,
)
from quantbench.methods.fp import FPConfig
from quantbench.methods.gptq import GPTQ, GPTQConfig
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.quantize import module_configs, quantize
from quantbench.methods.rtn import RTN, RTNConfig


class Draw(Method):
    """Records a draw from the global RNG and the calibration it was given."""

    name = "draw"
    config_cls = FPConfig

    def quantize(self, model, calib):
        self.artifacts.update(draw=torch.rand(3), calib=calib)
        return model


class DrawCalibrated(Draw):
    name = "draw-calibrated"
    needs_calibration = True


@pytest.fixture(autouse=True)
def _draw_methods(monkeypatch):
    monkeypatch.setitem(base.METHODS._entries, "draw", Draw)
    monkeypatch.setitem(base.METHODS._entries, "draw-calibrated", DrawCalibrated)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_llama().model.eval()


@pytest.fixture
def calib():
    return Calibration(torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(3)), "rand", 0)


# --------------------------------------------------------------------------- quantize()


def test_seeded_once_before_the_first_method_and_the_stream_continues():
    model = torch.nn.Linear(4, 4)
    _, ms = quantize(model, [("draw", {}), ("draw", None)], seed=5)
    torch.manual_seed(5)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([m.artifacts["draw"] for m in ms]), expected)
    _, again = quantize(model, [("draw", {})], seed=5)
    assert torch.equal(again[0].artifacts["draw"], expected[:3])
    torch.manual_seed(9)
    _, unseeded = quantize(model, [("draw", {})], seed=None)  # the global RNG is left as it is
    torch.manual_seed(9)
    assert torch.equal(unseeded[0].artifacts["draw"], torch.rand(3))


def test_calibration_only_where_needed_and_made_lazily_once(calib):
    made = []

    def make():
        made.append(1)
        return calib

    model = torch.nn.Linear(4, 4)
    _, ms = quantize(model, [("draw", {})], make)
    assert made == [] and ms[0].artifacts["calib"] is None
    _, ms = quantize(model, [("draw", {}), ("draw-calibrated", {}), ("draw-calibrated", {})], make)
    assert made == [1]
    assert [m.artifacts["calib"] for m in ms] == [None, calib, calib]
    _, ms = quantize(model, [("draw-calibrated", {})], calib)  # a Calibration is used as it is
    assert ms[0].artifacts["calib"] is calib


def test_methods_built_or_given_and_artifact_dirs(tmp_path):
    given = Draw()
    _, ms = quantize(torch.nn.Linear(4, 4), [("draw", {"dtype": "float32"}), given], artifact_dir=tmp_path)
    assert ms[1] is given and isinstance(ms[0], Draw)
    assert [m.artifact_dir for m in ms] == [tmp_path / "draw", tmp_path / "draw"]
    _, ms = quantize(torch.nn.Linear(4, 4), [("draw", {})])
    assert ms[0].artifact_dir is None
    with pytest.raises(ConfigError, match="unknown parameter 'bits' for draw"):
        quantize(torch.nn.Linear(4, 4), [("draw", {"bits": 4})])


def test_chain_equals_the_methods_applied_by_hand(tiny, calib):
    chain = [("gptq", {"bits": 3, "group_size": 64}), ("kvquant", {"bits": 4})]
    q, ms = quantize(copy.deepcopy(tiny), chain, lambda: calib, seed=3)
    torch.manual_seed(3)
    ref = copy.deepcopy(tiny)
    for name, params in chain:
        ref = build_method(name, params).quantize(ref, calib)
    assert [m.name for m in ms] == ["gptq", "kvquant"]
    sd, sd_ref = q.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)


# --------------------------------------------------------------------------- per-module plans


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


@pytest.mark.parametrize("method", [GPTQ, RTN])
def test_plan_sets_each_module_and_the_rest_use_the_config(tiny, calib, method):
    names = _linears(tiny)
    plan = {names[0]: (2, 64), names[1]: (8, -1), names[2]: None}
    cfg = (GPTQConfig if method is GPTQ else RTNConfig)(bits=3, group_size=32)
    q = method(cfg).quantize(copy.deepcopy(tiny), calib, plan=plan)
    assert (q.get_submodule(names[0]).bits, q.get_submodule(names[0]).group_size) == (2, 64)
    per_channel = q.get_submodule(names[1])
    assert (per_channel.bits, per_channel.group_size) == (8, per_channel.in_features)
    assert type(q.get_submodule(names[2])) is torch.nn.Linear  # planned None: left unquantized
    for n in names[3:]:
        assert (q.get_submodule(n).bits, q.get_submodule(n).group_size) == (3, 32)


def test_rtn_plan_module_equals_rtn_at_that_setting(tiny):
    names = _linears(tiny)
    planned = RTN(RTNConfig(bits=4, include=names[:1])).quantize(copy.deepcopy(tiny), None, plan={names[0]: (2, 64)})
    direct = RTN(RTNConfig(bits=2, group_size=64, include=names[:1])).quantize(copy.deepcopy(tiny), None)
    a, b = planned.get_submodule(names[0]), direct.get_submodule(names[0])
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))


def test_gptq_plan_equal_to_config_reproduces_plain_gptq(tiny, calib):
    names = _linears(tiny)
    cfg = GPTQConfig(bits=3, group_size=64)
    plain = GPTQ(cfg).quantize(copy.deepcopy(tiny), calib)
    planned = GPTQ(cfg).quantize(copy.deepcopy(tiny), calib, plan={n: (3, 64) for n in names})
    sd, sd2 = plain.state_dict(), planned.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_plan_errors(tiny, calib):
    names = _linears(tiny)
    with pytest.raises(ConfigError, match="not selected linears: lm_head"):
        RTN().quantize(copy.deepcopy(tiny), None, plan={"lm_head": (4, 128)})
    with pytest.raises(ConfigError, match="gptq: bits=5"):
        GPTQ().quantize(copy.deepcopy(tiny), calib, plan={names[0]: (5, 128)})
    with pytest.raises(ConfigError, match="rtn: group_size"):
        RTN().quantize(copy.deepcopy(tiny), None, plan={names[0]: (4, 0)})


def test_module_configs_share_one_config_per_setting():
    cfg = RTNConfig(bits=4)
    out = module_configs(cfg, ["a", "b", "c", "d"], {"a": (2, 64), "b": (2, 64), "c": None}, "rtn")
    assert list(out) == ["a", "b", "d"] and out["d"] is cfg
    assert out["a"] is out["b"] and (out["a"].bits, out["a"].group_size, out["a"].sym) == (2, 64, False)


# --------------------------------------------------------------------------- the module-selection mixin


SELECTIVE = ["gptq", "rtn", "mixed", "w8a8", "smoothquant", "bitnet-ptq", "bitnet-1bit", "bitnet-qat"]


@pytest.mark.parametrize("name", SELECTIVE)
def test_selective_configs_share_the_mixin(name):
    cls = base.get_method(name).config_cls
    assert issubclass(cls, ModuleSelection)
    cfg = cls(include=["*proj"], exclude=["lm_head"])
    assert cfg.include == ("*proj",) and cfg.exclude == ("lm_head",)
    assert cls().include == ("*",) and cls().exclude == base.DEFAULT_SKIP
    # the method's own parameters first, the selection last, then the version (records keep that order)
    assert list(cfg.to_dict())[-3:] == ["include", "exclude", "version"]
    assert cls.param_names()[-2:] == ["include", "exclude"]
    with pytest.raises(ConfigError, match="include must be a list of glob patterns"):
        cls(include="*proj")


def test_gptq_and_rtn_records_unchanged():
    assert list(GPTQConfig().to_dict()) == [
        "bits",
        "group_size",
        "sym",
        "act_order",
        "static_groups",
        "percdamp",
        "blocksize",
        "true_sequential",
        "mse",
        "group_grid",
        "offload",
        "include",
        "exclude",
        "version",
    ]
    assert RTNConfig(3, 64).to_dict() == {  # positional arguments are the method's own, as before
        "bits": 3,
        "group_size": 64,
        "sym": False,
        "include": ("*",),
        "exclude": ("lm_head", "*embed*", "*wte*", "*wpe*"),
        "version": 1,
    }
    assert dataclasses.replace(RTNConfig(), include=["a"]).include == ("a",)


# --------------------------------------------------------------------------- the one fingerprint


def _sensitivity_key_as_first_released(model):
    h = hashlib.sha256()
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_weights_fingerprint_keeps_the_sensitivity_cache_key(tiny):
    assert model_fingerprint(tiny, exact=False) == _sensitivity_key_as_first_released(tiny)


def test_exact_fingerprint_sees_packed_buffers_and_dtype(tiny):
    names = _linears(tiny)
    q3 = RTN(RTNConfig(bits=3)).quantize(copy.deepcopy(tiny), None)
    q4 = RTN(RTNConfig(bits=4)).quantize(copy.deepcopy(tiny), None)
    assert isinstance(q3.get_submodule(names[0]), IntQuantLinear)
    # the remaining parameters (embeddings, norms) are equal: only the exact fingerprint tells them apart
    assert model_fingerprint(q3, exact=False) == model_fingerprint(q4, exact=False)
    assert model_fingerprint(q3) != model_fingerprint(q4)
    assert model_fingerprint(q3) == model_fingerprint(copy.deepcopy(q3))
    assert model_fingerprint(tiny) != model_fingerprint(copy.deepcopy(tiny).to(torch.float64))
