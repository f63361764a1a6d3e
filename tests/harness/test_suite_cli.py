"""Suites are validated before any work; the CLI reports one clear error and exits 2."""

import subprocess
import sys

import pytest
import yaml

from quantbench.harness.cli import main
from quantbench.harness.run.suite import load_suite, parse_suite
from quantbench.methods.base import ConfigError

BASE = {
    "name": "t",
    "models": ["tiny-llama"],
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity"],
    "cells": [{"method": "fp"}, {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}}],
}


def with_(**kw):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cells": [{"method": "rtn", "params": {"bitz": 4}}]},
         "unknown parameter 'bitz' for rtn (did you mean 'bits'?)"),
        ({"cells": [{"method": "gtpq"}]}, "unknown method 'gtpq' (did you mean 'gptq'?)"),
        ({"metrics": ["perplexity", "kl_divergance"]},
         "unknown metric 'kl_divergance' (did you mean 'kl_divergence'?)"),
        ({"models": ["smollm-135m"]}, "unknown model 'smollm-135m' (did you mean 'smollm2-135m'?)"),
        ({"eval": {"dataset": "wikitxt"}}, "unknown dataset 'wikitxt'"),
        ({"eval": {"protocol": "rolling"}}, "unknown protocol 'rolling'"),
        ({"cells": [{"method": "rtn", "params": {"bits": 9}}]}, "bits must be in 2..8"),
        ({"cells": [{"method": "fp"}, {"method": "fp"}]}, "duplicate cell name 'fp'"),
        ({"cels": []}, "unknown key 'cels' (did you mean 'cells'?)"),
    ],
)
def test_bad_suites_name_the_problem(change, message):
    with pytest.raises(ConfigError) as e:
        parse_suite(with_(**change))
    assert message in str(e.value)


def test_valid_suite_parses_with_defaults():
    s = parse_suite(BASE)
    assert [c.name for c in s.cells] == ["fp", "r4"]
    assert s.cells[1].chain[0].params == {"bits": 4, "group_size": 64}
    assert s.eval["seq_len"] == 64 and s.eval["stride"] is None


def test_shipped_suites_validate():
    for name in ("smoke", "default"):
        load_suite(f"suites/{name}.yaml")


def test_cli_validate_misspelled_parameter_exits_2_with_one_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(with_(cells=[{"method": "rtn", "params": {"group": 128}}])))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown parameter 'group' for rtn" in err and "group_size" in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(with_(cells=[{"method": "rtn", "params": {"group": 128}}])))
    r = subprocess.run([sys.executable, "-m", "quantbench.harness.cli", "run", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown parameter 'group'" in r.stderr
    assert not (tmp_path / "o").exists()  # failed before any work
