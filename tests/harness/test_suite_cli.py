"""Suites are validated before any work; the CLI reports one clear error and exits 2."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantbench.harness import cli
from quantbench.harness.cli import main
from quantbench.harness.paths import SUITES_DIR
from quantbench.harness.run.suite import (
    CalibrationSpec,
    EvalSpec,
    ExecutorSpec,
    ResourcesSpec,
    load_suite,
    parse_suite,
    resolved_yaml,
)
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
        ({"eval": {"seq_len": "1024"}}, "suite.eval: seq_len must be a positive integer, got '1024'"),
        # tolerances and executor are checked at load, not when `compare` or `run --executor` reads them
        ({"tolerances": {"perplexty": {"rel": 0.01}}},
         "suite.tolerances: unknown metric 'perplexty' (did you mean 'perplexity'?)"),
        ({"tolerances": {"perplexity": {"rell": 0.01}}},
         "suite.tolerances.perplexity: unknown key 'rell' (did you mean 'rel'?)"),
        ({"tolerances": {"accuracy": {"recovery": 1.5}}}, "suite.tolerances.accuracy.recovery: expected a number"),
        ({"executor": {"name": "rey"}}, "suite.executor: unknown executor 'rey' (did you mean 'ray'?)"),
        ({"executor": "lokal"}, "unknown executor 'lokal' (did you mean 'local'?)"),
        ({"executor": {"name": "ray", "adress": "auto"}},
         "suite.executor: unknown key 'adress' (did you mean 'address'?)"),
        ({"executor": {"address": "auto"}}, "address applies to the ray executor only"),
        ({"executor": {"name": "ray", "num_cpus": 0}}, "num_cpus must be a positive integer, got 0"),
        ({"resources": {"num_gpu": 1}}, "suite.resources: unknown key 'num_gpu' (did you mean 'num_gpus'?)"),
        ({"cells": [{"method": "fp", "resources": {"memory": "16G"}}]},
         "suite.cells[0].resources: memory must be a positive integer (bytes), got '16G'"),
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
    assert s.eval == EvalSpec("wiki", "gptq", 64, None, 2)
    assert s.cells[1].calibration == CalibrationSpec("wiki", 2, 64)
    assert s.tolerances == {} and s.executor == ExecutorSpec("local") and s.resources == ResourcesSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]


def test_blocks_are_typed_and_cells_resolve_against_them():
    s = parse_suite(with_(
        tolerances={"perplexity": {"rel": 0.002}, "accuracy": {"recovery": 1}},
        executor={"name": "ray", "address": "auto"},
        resources={"num_cpus": 2, "memory": 1 << 30},
        latency={"context": 8},
        cells=[{"name": "a", "method": "fp", "calibration": {"n_samples": 4}, "resources": {"num_gpus": 0.5}},
               {"name": "b", "method": "fp", "latency": {"batch": 2}}],
    ))
    assert s.tolerances == {"perplexity": {"rel": 0.002}, "accuracy": {"recovery": 1.0}}
    assert s.executor == ExecutorSpec("ray", "auto", None) and parse_suite(with_(executor="ray")).executor.name == "ray"
    a, b = s.cells
    assert a.calibration == CalibrationSpec("wiki", 4, 64) and b.calibration == s.calibration
    assert s.resources.merged(a.resources) == ResourcesSpec(num_cpus=2, num_gpus=0.5, memory=1 << 30)
    assert s.resources.merged(b.resources) == s.resources
    assert s.latency == {"context": 8} and a.latency is None and b.latency == {"batch": 2}


def test_shipped_suites_validate():
    for path in sorted(SUITES_DIR.glob("*.yaml")):
        s = load_suite(path)
        assert s.cells and "include" not in s.raw, path


def test_validate_counts_model_cell_pairs(capsys):
    """bitnet.yaml's cells each name one of its two models: 8 pairs, not 2 x 8."""
    assert main(["validate", str(SUITES_DIR / "bitnet.yaml")]) == 0
    assert "2 model(s) x 8 cell(s), 8 model-cell pairs, metrics:" in capsys.readouterr().out
    assert main(["validate", str(SUITES_DIR / "kv.yaml")]) == 0
    assert "pairs" not in capsys.readouterr().out


# --------------------------------------------------------------------------- include


def write(tmp: Path, name: str, doc: dict) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_include_composes_cells_in_order_and_own_keys_win(tmp_path):
    write(tmp_path, "parts/a.yaml", {
        **BASE, "name": "a", "tolerances": {"perplexity": {"rel": 0.5}},
        "cells": [{"name": "fp", "method": "fp"},
                  {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64},
                   "calibration": {"n_samples": 3}}],
    })
    # b.yaml lives beside a.yaml and names it relative to itself
    write(tmp_path, "parts/b.yaml", {
        "include": "a.yaml", "name": "b", "metrics": ["perplexity", "bits_per_weight"],
        "cells": [{"name": "r3", "method": "rtn", "params": {"bits": 3, "group_size": 64}}],
    })
    write(tmp_path, "parts/c.yaml", {"eval": {"seq_len": 32}, "cells": [{"name": "w8a8", "method": "w8a8"}]})
    top = write(tmp_path, "top.yaml", {
        "name": "top", "include": ["parts/b.yaml", "parts/c.yaml"],
        "calibration": {"n_samples": 8},  # a whole block: seq_len falls back to the default, not a.yaml's 64
        "cells": [{"name": "r8", "method": "rtn", "params": {"bits": 8, "group_size": -1}}],
    })
    s = load_suite(top)
    assert [c.name for c in s.cells] == ["fp", "r4", "r3", "w8a8", "r8"]  # included first, in order, then own
    assert s.name == "top" and s.models == ("tiny-llama",)
    assert s.eval == EvalSpec("wiki", "gptq", 32, None, None)  # c.yaml's eval replaced a.yaml's (later include)
    assert s.calibration == CalibrationSpec("wiki", 8, 512)  # own key over the included
    assert s.metrics == ("perplexity", "bits_per_weight")  # b.yaml's own key over its include a.yaml
    assert s.tolerances == {"perplexity": {"rel": 0.5}}
    by = {c.name: c for c in s.cells}
    assert by["fp"].calibration == s.calibration and by["fp"].metrics == s.metrics  # resolved against top
    assert by["r4"].calibration == CalibrationSpec("wiki", 3, 512)  # a cell's own override travels with it
    assert "include" not in s.raw and [c["name"] for c in s.raw["cells"]] == [c.name for c in s.cells]
    # the merged document stands alone (the Ray worker and the run dir need no include files)
    assert resolved_yaml(parse_suite(s.raw)) == resolved_yaml(s)


def test_include_a_later_cell_replaces_an_earlier_one_in_place(tmp_path):
    write(tmp_path, "a.yaml", BASE)  # cells fp, r4 (rtn bits 4)
    write(tmp_path, "b.yaml", {"cells": [{"name": "x", "method": "fp"}, {"name": "r4", "method": "w8a8"}]})
    top = write(tmp_path, "top.yaml", {"include": ["a.yaml", "b.yaml"], "name": "top",
                                       "cells": ["fp", {"name": "r4", "method": "rtn", "params": {"bits": 8}}]})
    s = load_suite(top)
    assert [c.name for c in s.cells] == ["fp", "r4", "x"]  # replaced where first defined
    assert s.cells[1].chain[0].method == "rtn" and s.cells[1].chain[0].params == {"bits": 8}  # the last file wins
    assert resolved_yaml(parse_suite(s.raw)) == resolved_yaml(s)


def test_include_duplicate_cell_name_within_one_file_names_both_places(tmp_path):
    write(tmp_path, "a.yaml", BASE)
    write(tmp_path, "b.yaml", {"cells": [{"name": "r4", "method": "fp"}, {"name": "r4", "method": "w8a8"}]})
    top = write(tmp_path, "top.yaml", {"include": ["a.yaml", "b.yaml"], "name": "top"})
    with pytest.raises(ConfigError) as e:
        load_suite(top)
    assert "b.yaml.cells[1]: duplicate cell name 'r4' (also b.yaml.cells[0])" in str(e.value)


@pytest.mark.parametrize("files, message", [
    ({"top.yaml": {"include": "a.yaml"}, "a.yaml": {"include": ["b.yaml"]}, "b.yaml": {"include": "a.yaml"}},
     "b.yaml.include: include cycle: a.yaml -> b.yaml -> a.yaml"),
    ({"top.yaml": {"include": "top.yaml"}}, "top.yaml.include: include cycle: top.yaml -> top.yaml"),
    ({"top.yaml": {"include": ["defualt.yaml"]}, "default.yaml": BASE},
     "top.yaml.include: no file 'defualt.yaml' next to top.yaml (did you mean 'default.yaml'?)"),
    ({"top.yaml": {"include": [{"path": "a.yaml"}]}}, "top.yaml.include: expected a file name or a list"),
    ({"top.yaml": {"include": "a.yaml"}, "a.yaml": {**BASE, "cells": [{"method": "rtn", "params": {"bitz": 4}}]}},
     "a.yaml.cells[0]: unknown parameter 'bitz' for rtn"),  # an included cell's error names its own file
    ({"top.yaml": {"include": "a.yaml"}, "a.yaml": {**BASE, "tolerances": {"kl": {"rel": 1}}}},
     "a.yaml.tolerances: unknown metric 'kl'"),
])
def test_include_errors(tmp_path, files, message):
    for name, doc in files.items():
        write(tmp_path, name, {**doc, "name": Path(name).stem} if "include" in doc else doc)
    with pytest.raises(ConfigError) as e:
        load_suite(tmp_path / "top.yaml")
    assert message in str(e.value)


def test_cli_executor_defaults_to_the_suites(tmp_path, monkeypatch):
    called = []

    class Dispatched(Exception):
        pass

    def fake(name):
        def run(suite, out, *args, **kw):
            called.append((name, kw.get("address")))
            raise Dispatched

        return run

    monkeypatch.setattr(cli, "run_suite_ray", fake("ray"))
    monkeypatch.setattr(cli, "run_suite", fake("local"))
    p = write(tmp_path, "s.yaml", with_(executor={"name": "ray", "address": "auto"}))
    for extra in ([], ["--executor", "local"], ["--executor", "ray", "--address", "ray://h:1"]):
        with pytest.raises(Dispatched):
            cli.cmd_run(cli.build_parser().parse_args(["run", str(p), *extra]))
    # the suite's address is read by run_suite_ray itself (None here: not overridden)
    assert called == [("ray", None), ("local", None), ("ray", "ray://h:1")]


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


def test_plugins_show_in_ls_and_validate(monkeypatch, capsys, tmp_path):
    from quantbench.harness.measure import METRICS
    from quantbench.methods import registry
    from quantbench.methods.base import METHODS

    monkeypatch.setenv("QUANTBENCH_PLUGINS", "tests.harness.plugin_extras")
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", set())
    try:
        assert main(["ls", "methods"]) == 0
        assert "test-plugin-identity" in capsys.readouterr().out
        assert main(["ls", "metrics"]) == 0
        assert "test_plugin_param_count" in capsys.readouterr().out
        doc = {**BASE, "metrics": ["perplexity", "test_plugin_param_count"],
               "cells": [{"name": "p", "method": "test-plugin-identity"}]}
        s = parse_suite(doc)
        assert s.cells[0].chain[0].method == "test-plugin-identity"
        assert s.metrics == ("perplexity", "test_plugin_param_count")
    finally:  # the registries are process-wide: leave them as other tests expect
        METHODS._entries.pop("test-plugin-identity", None)
        METRICS._entries.pop("test_plugin_param_count", None)


def test_a_missing_plugin_module_is_one_clear_error(monkeypatch, capsys):
    from quantbench.methods import registry

    monkeypatch.setenv("QUANTBENCH_PLUGINS", "no_such_quantbench_plugin")
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", set())
    assert main(["ls", "methods"]) == 2
    assert capsys.readouterr().err.strip() == "error: QUANTBENCH_PLUGINS: no module named 'no_such_quantbench_plugin'"
