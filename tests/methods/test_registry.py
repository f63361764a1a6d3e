"""The lazy method registry: every listed module registers its name; configs are frozen and versioned."""

import dataclasses

import pytest

from quantbench.methods.base import METHODS, ConfigError, build_method, get_method

# the methods the README documents; each must be found by name without a second list in the code
DOCUMENTED = ["fp", "rtn", "gptq", "w8a8", "smoothquant", "bitnet-ptq", "bitnet-1bit", "bitnet-qat", "kv-fp16",
              "kv-uniform", "kivi", "kvquant", "llamacpp", "mixed", "absmax", "awq", "hqq", "fp8", "fp8-weight",
              "mxfp4", "nvfp4", "mxfp4-a4", "nvfp4-a4"]


def test_registry_discovers_every_documented_method():
    assert set(DOCUMENTED) <= set(METHODS.names())


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_listed_method_registers_itself(name):
    cls = get_method(name)
    assert cls.name == name
    cfg = cls.config_cls()
    if cfg.param_names():
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, cfg.param_names()[0], None)
    d = cfg.to_dict()
    assert d["version"] >= 1 and set(d) - {"version"} == set(cls.config_cls.param_names())


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_method("rtn", {"group": 128})
    assert "unknown parameter 'group' for rtn (did you mean 'group_size'?); valid:" in str(e.value)
    assert "bits" in str(e.value)
