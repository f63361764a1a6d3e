"""A bad suite is one ConfigError line before anything runs, for `validate` and `run` alike (issue U):
the inputs that used to raise a traceback, and the wrong suites that used to be accepted."""

import copy
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantbench.harness.cli import main
from quantbench.harness.paths import SUITES_DIR
from quantbench.harness.run.suite import MAX_NODES, load_suite, parse_suite, resolved_yaml
from quantbench.methods.base import METHODS, ConfigError, build_method

BASE = {
    "name": "t",
    "models": ["tiny-llama"],
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity"],
    "cells": [{"method": "fp"}, {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}}],
}


def with_(**kw):
    d = copy.deepcopy(BASE)
    d.update(kw)
    return d


def cell(method, **params):
    return with_(cells=[{"name": "c", "method": method, "params": params}])


def one_line_error(fn, *args):
    with pytest.raises(ConfigError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


# --------------------------------------------------------------------------- documents


BAD = {  # id: (document, a fragment of the one-line message)
    # ---- raised something other than ConfigError (a traceback) before
    "chain-entry-without-method": (with_(cells=[{"name": "c", "method": [{"params": {"bits": 4}}]}]),
                                   "suite.cells[0].method[0]: missing 'method'"),
    "chain-entry-method-not-a-name": (with_(cells=[{"name": "c", "method": [{"method": ["rtn"]}]}]),
                                      "suite.cells[0].method[0]: 'method' must be a name, got ['rtn']"),
    "method-5": (with_(cells=[{"method": 5}]), "suite.cells[0]: 'method' must be a name or a list, got 5"),
    "non-string-top-level-key": ({**BASE, 5: 1}, "suite: a key is a name, got 5 (int)"),
    "non-string-cell-key": (with_(cells=[{"method": "fp", None: 1}]), "suite.cells[0]: a key is a name, got None"),
    "non-string-param-name": (with_(cells=[{"method": "rtn", "params": {5: 1}}]),
                              "rtn: a parameter name is a string, got 5"),
    "eval-dataset-null": (with_(eval={"dataset": None}), "suite.eval: dataset must be a name, got None"),
    "eval-dataset-list": (with_(eval={"dataset": ["wiki"]}), "suite.eval: dataset must be a name, got ['wiki']"),
    "calibration-dataset-null": (with_(calibration={"dataset": None}),
                                 "suite.calibration: dataset must be a name, got None"),
    "calibration-dataset-list": (with_(calibration={"dataset": ["wiki"]}),
                                 "suite.calibration: dataset must be a name, got ['wiki']"),
    "metrics-mapping-entry": (with_(metrics=[{"a": 1}]), "suite.metrics: a metric is a name, got {'a': 1}"),
    "calibration-list": (with_(calibration=[1, 2]), "suite.calibration: expected a mapping, got list"),
    "calibration-string": (with_(calibration="wiki"), "suite.calibration: expected a mapping, got str"),
    "resources-list": (with_(resources=[1]), "suite.resources: expected a mapping, got list"),
    "tolerances-list": (with_(tolerances=[1]), "suite.tolerances: expected a mapping of metric"),
    "tolerances-non-string-metric": (with_(tolerances={1: {"rel": 0.1}}),
                                     "suite.tolerances: a metric is a name, got 1"),
    "tasks-unnamed-entry": (with_(tasks=[{"name": ["x"]}]), "suite.tasks[0]: a task is a name or a mapping"),
    "empty-document": (None, "suite: empty document"),
    "latency-null": (with_(latency=None), "suite.latency: latency must be a mapping, got None"),
    "cell-latency-null": (with_(cells=[{"method": "fp", "latency": None}]),
                          "suite.cells[0].latency: latency must be a mapping, got None"),
    # ---- accepted although wrong
    "eval-seq_len-0": (with_(eval={"seq_len": 0}), "suite.eval: seq_len must be a positive integer, got 0"),
    "eval-seq_len-negative": (with_(eval={"seq_len": -5}), "suite.eval: seq_len must be a positive integer, got -5"),
    "eval-seq_len-string": (with_(eval={"seq_len": "abc"}),
                            "suite.eval: seq_len must be a positive integer, got 'abc'"),
    "eval-max_windows-negative": (with_(eval={"max_windows": -1}),
                                  "suite.eval: max_windows must be a positive integer or null, got -1"),
    "eval-stride-0": (with_(eval={"stride": 0}), "suite.eval: stride must be a positive integer or null, got 0"),
    "eval-protocol-list": (with_(eval={"protocol": ["gptq"]}), "suite.eval: unknown protocol ['gptq']"),
    "rtn-bits-float": (cell("rtn", bits=4.5), "suite.cells[0]: rtn: bits must be an integer, got 4.5"),
    "rtn-sym-string": (cell("rtn", sym="no"), "rtn: sym must be true or false, got 'no'"),
    "rtn-include-string": (cell("rtn", include="lm_head"), "rtn: include must be a list of strings, got 'lm_head'"),
    "smoothquant-alpha-string": (cell("smoothquant", alpha="0.5"), "smoothquant: alpha must be a number, got '0.5'"),
    "smoothquant-alpha-nan": (cell("smoothquant", alpha=math.nan), "smoothquant: alpha must be a number, got nan"),
    "kvquant-fisher-string": (cell("kvquant", fisher="false"), "kvquant: fisher must be true or false, got 'false'"),
    "kvquant-qnorm-int": (cell("kvquant", qnorm=1), "kvquant: qnorm must be true or false or null, got 1"),
    "gptq-bits-bool": (cell("gptq", bits=True), "gptq: bits must be an integer, got True"),
    "llamacpp-imatrix-int": (cell("llamacpp", imatrix=1), "llamacpp: imatrix must be true or false, got 1"),
    "mixed-bits_choices-strings": (cell("mixed", bits_choices=["2", "3"]),
                                   "mixed: bits_choices must be a list of integers, got ['2', '3']"),
    "mixed-base_choice-int": (cell("mixed", base_choice=3), "mixed: base_choice must be a list of integers, got 3"),
    "bitnet-act_bits-string": (cell("bitnet-ptq", act_bits="8"), "bitnet-ptq: act_bits must be an integer or null"),
    "fp-dtype-list": (cell("fp", dtype=["float32"]), "fp: dtype must be a string, got ['float32']"),
    "kvquant-kmeans_iters-0": (cell("kvquant", kmeans_iters=0), "kvquant: kmeans_iters must be in 1..1000000"),
    "mixed-resolution-huge": (cell("mixed", resolution=10**9), "mixed: resolution must be in 100..10000000"),
    "rtn-group_size-huge": (cell("rtn", group_size=10**25), "rtn: group_size must be in 1..1048576 or -1"),
    "bitnet-qat-weight_decay-negative": (cell("bitnet-qat", weight_decay=-0.1),
                                         "bitnet-qat: weight_decay must be in [0, 1)"),
    "tolerance-nan": (with_(tolerances={"perplexity": {"rel": math.nan}}),
                      "suite.tolerances.perplexity.rel: expected a finite number, got nan"),
    "tolerance-inf": (with_(tolerances={"perplexity": {"abs": math.inf}}), "expected a finite number, got inf"),
    "tolerance-huge-int": (with_(tolerances={"perplexity": {"abs": 10**400}}), "perplexity.abs: expected a finite"),
    "resources-num_gpus-huge-int": (with_(resources={"num_gpus": 10**400}), "num_gpus must be a number"),
    "smoothquant-alpha-huge-int": (cell("smoothquant", alpha=10**400), "smoothquant: alpha must be a number"),
    "tolerance-recovery-over-1": (with_(tolerances={"accuracy": {"recovery": 1.5}}),
                                  "suite.tolerances.accuracy.recovery: expected a number"),
    "resources-num_cpus-inf": (with_(resources={"num_cpus": math.inf}), "suite.resources: num_cpus must be a number"),
    "resources-num_gpus-negative": (with_(resources={"num_gpus": -1}), "suite.resources: num_gpus must be a number"),
    "resources-memory-float": (with_(resources={"memory": 1.5e9}),
                               "suite.resources: memory must be a positive integer (bytes), got 1500000000.0"),
    "resources-max_retries-huge": (with_(resources={"max_retries": 10**6}),
                                   "suite.resources: max_retries must be at most 1000"),
    "cell-resources-string": (with_(cells=[{"method": "fp", "resources": "gpu"}]),
                              "suite.cells[0].resources: expected a mapping, got str"),
    "executor-address-empty": (with_(executor={"name": "ray", "address": ""}), "suite.executor: address must be"),
    "executor-address-list": (with_(executor={"name": "ray", "address": ["auto"]}), "suite.executor: address must"),
    "executor-name-list": (with_(executor={"name": ["ray"]}), "suite.executor: unknown executor ['ray']"),
    "executor-num_cpus-huge": (with_(executor={"name": "ray", "num_cpus": 10**9}),
                               "suite.executor: num_cpus must be at most 1000000"),
    "seed-2**70": (with_(seed=2**70), "suite.seed: seed must be in 0..4294967295"),
    "seed-negative": (with_(seed=-1), "suite.seed: seed must be in 0..4294967295"),
    "seed-float": (with_(seed=1.5), "suite.seed: seed must be an integer, got 1.5"),
    "n_samples-10**25": (with_(calibration={"n_samples": 10**25}),
                         "suite.calibration: n_samples must be at most 1000000, got 10000000000000000000000000"),
    "calibration-seq_len-huge": (with_(calibration={"seq_len": 10**7}), "seq_len must be at most 1000000"),
    "cell-calibration-n_samples-huge": (with_(cells=[{"method": "fp", "calibration": {"n_samples": 10**7}}]),
                                        "suite.cells[0].calibration: n_samples must be at most 1000000"),
    "eval-seq_len-huge": (with_(eval={"seq_len": 10**7}), "suite.eval: seq_len must be at most 1000000"),
    "eval-max_windows-huge": (with_(eval={"max_windows": 10**25}), "suite.eval: max_windows must be at most 1000000"),
    "latency-huge": (with_(latency={"context": 10**9}), "suite.latency: latency.context must be at most 1000000"),
    "task-limit-huge": (with_(tasks=[{"name": "wiki_cloze", "limit": 10**9}]),
                        "suite.tasks[0]: limit must be at most 1000000"),
    "name-null": (with_(name=None), "suite.name: name must be a non-empty string, got None"),
    "name-empty": (with_(name=""), "suite.name: name must be a non-empty string"),
    "name-int": (with_(name=5), "suite.name: name must be a non-empty string, got 5"),
    "name-path-separator": (with_(name="runs/x"), "suite.name: name 'runs/x' names the run directory"),
    "name-parent-dir": (with_(name=".."), "suite.name: name '..' names the run directory"),
    "name-newline": (with_(name="a\nb"), "suite.name: name must not hold control characters"),
    "description-list": (with_(description=["a"]), "suite.description: description must be a string"),
    "cell-name-null": (with_(cells=[{"name": None, "method": "fp"}]),
                       "suite.cells[0]: a cell's name must be a non-empty string, got None"),
    "cell-name-list": (with_(cells=[{"name": ["x"], "method": "fp"}]), "a cell's name must be a non-empty string"),
    "cell-name-newline": (with_(cells=[{"name": "a\nb", "method": "fp"}]),
                          "suite.cells[0]: a cell's name must not hold control characters (newlines, tabs)"),
    "metric-twice": (with_(metrics=["perplexity", "perplexity"]), "suite.metrics: metric 'perplexity' is listed twice"),
    "model-twice": (with_(models=["tiny-llama", "tiny-llama"]), "suite.models: model 'tiny-llama' is listed twice"),
    "model-name-int": (with_(models=[{"name": 5, "path": "."}]), "suite.models: model name must be a non-empty string"),
    "model-path-missing": (with_(models=[{"name": "m", "path": "/nonexistent/quantbench/model"}]),
                           "suite.models: model path '/nonexistent/quantbench/model' does not exist"),
    "model-path-nul": (with_(models=[{"name": "m", "path": "a\0b"}]), "model path must be a non-empty string"),
    "model-path-too-long": (with_(models=[{"name": "m", "path": "x" * 5000}]), "suite.models: model path 'xxx"),
    "unknown-key-with-newline": (with_(**{"a\nb": 1}), "suite: unknown key 'a\\nb'"),
}


@pytest.mark.parametrize("doc, message", list(BAD.values()), ids=list(BAD))
def test_bad_suite_is_one_config_error_line(doc, message):
    assert message in one_line_error(parse_suite, doc)


def test_a_one_step_method_list_is_the_method_itself():
    """``method: [rtn]`` is a chain of one step: the same cell as ``method: rtn`` (accepted, named 'rtn')."""
    as_list = parse_suite(with_(cells=[{"method": ["rtn"]}, {"method": [{"method": "gptq", "params": {"bits": 3}}]}]))
    plain = parse_suite(with_(cells=[{"method": "rtn"}, {"method": "gptq", "params": {"bits": 3}}]))
    assert [c.name for c in as_list.cells] == ["rtn", "gptq(bits=3)"] == [c.name for c in plain.cells]
    assert [c.chain for c in as_list.cells] == [c.chain for c in plain.cells]
    assert "duplicate cell name 'rtn'" in one_line_error(parse_suite, with_(cells=["rtn", {"method": ["rtn"]}]))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_defaults_pass_its_own_type_check(name):
    """The annotations the type check reads agree with each config's defaults (as a suite would write them)."""
    cls = METHODS.get(name).config_cls
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cls().to_dict().items() if k != "version"}
    assert build_method(name, defaults).config == cls()


def test_type_check_accepts_what_suites_write():
    assert build_method("smoothquant", {"alpha": 1}).config.alpha == 1  # an int is a number
    assert build_method("mixed", {"base_choice": [3, 128], "sensitivity": "fisher-kl"}).config.base_choice == (3, 128)
    assert build_method("bitnet-ptq", {"act_bits": None}).config.act_bits is None
    assert build_method("kvquant", {"qnorm": None, "fisher": False}).config.fisher is False
    assert build_method("rtn", {"include": ["*proj"], "exclude": []}).config.include == ("*proj",)


@pytest.mark.parametrize("params, message", [
    ("bits=4", "rtn: params must be a mapping, got 'bits=4'"),
    ({"bits": "4"}, "rtn: bits must be an integer, got '4'"),
    ({"exclude": ["lm_head", 3]}, "rtn: exclude must be a list of strings, got ['lm_head', 3]"),
])
def test_build_method_checks_types_directly(params, message):
    assert message in one_line_error(build_method, "rtn", params)


# --------------------------------------------------------------------------- model specs


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def _gguf(path: Path, magic: bytes = b"GGUF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(magic + b"\x03\x00\x00\x00" + bytes(16))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda t: {"name": "m", "path": str(_hf_dir(t / "hf")), "dtype": "float33"},
     "model dtype 'float33' is not valid (did you mean 'float32'?)"),
    (lambda t: {"name": "m", "path": str(_hf_dir(t / "hf")), "dtype": ["float32"]}, "model dtype ['float32']"),
    (lambda t: {"name": "m", "path": str(_gguf(t / "m.gguf", b"PK\x03\x04"))}, "is not a GGUF file"),
    (lambda t: {"name": "m", "path": str(_gguf(t / "m.bin"))}, "is not a GGUF file"),  # GGUF bytes, not a .gguf
    (lambda t: {"name": "m", "path": str(t)}, "is neither a Hugging Face model directory (no config.json)"),
    (lambda t: {"name": "m", "path": str(_hf_dir(t / "hf")), "gguf_file": "absent.gguf"}, "does not exist"),
    (lambda t: {"name": "m", "path": str(_gguf(t / "m.gguf")), "gguf_file": "m.gguf"},
     "must be the directory holding gguf_file"),
    (lambda t: {"name": "m", "path": str(t), "gguf_file": "../m.gguf"}, "gguf_file must be the name of a .gguf file"),
    (lambda t: {"name": "m", "path": str(_gguf(t / "m.gguf")), "device_map": "auto"},
     "device_map applies to Hugging Face directories"),
    (lambda t: {"name": "m", "path": str(_hf_dir(t / "hf")), "device_map": 3}, "device_map must be a string"),
])
def test_model_spec_is_checked_before_any_load(tmp_path, make, message):
    assert message in one_line_error(parse_suite, with_(models=[make(tmp_path)]))


def test_model_specs_that_load_are_accepted(tmp_path):
    hf = _hf_dir(tmp_path / "hf")
    gguf = _gguf(tmp_path / "g" / "m.gguf")
    s = parse_suite(with_(models=[
        {"name": "hf", "path": str(hf), "dtype": "bfloat16", "device_map": "auto"},
        {"name": "g1", "path": str(gguf)},
        {"name": "g2", "path": str(gguf.parent), "gguf_file": "m.gguf", "dtype": "float16"},
    ]))
    assert len(s.models) == 3


# --------------------------------------------------------------------------- files


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


SUITE_TEXT = yaml.safe_dump(BASE, sort_keys=False)
N_LINES = SUITE_TEXT.count("\n")
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


@pytest.mark.parametrize("data, message", [
    (bytes(range(256)), "bad.yaml: not UTF-8 text (byte 0x80 on line 2); save the suite as UTF-8"),
    ("name: t\ndescription: caf\xe9\n".encode("latin-1"), "bad.yaml: not UTF-8 text (byte 0xe9 on line 2)"),
    (SUITE_TEXT + "seed: 1\nseed: 2\n",
     f"bad.yaml: duplicate key 'seed' at line {N_LINES + 2} (first at line {N_LINES + 1})"),
    ("name: t\ncells:\n- {method: rtn, params: {bits: 4, bits: 3}}\n",
     "bad.yaml: duplicate key 'bits' at line 3 (first at line 3)"),
    (BOMB + SUITE_TEXT, f"bad.yaml: the document expands to more than {MAX_NODES} nodes"),
    ("a: &a [*a]\n" + SUITE_TEXT, "bad.yaml: an alias at line 1 refers to a node that contains it"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "bad.yaml: nested deeper than 64 levels"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "bad.yaml: invalid YAML: nested too deeply"),
    ("name: t\n\tmodels: [tiny-llama]\n", "bad.yaml: invalid YAML at line 2, column 1:"),
    ("name: [t\n", "bad.yaml: invalid YAML at line 2, column 1:"),
    ("name: *nowhere\n", "bad.yaml: invalid YAML at line 1, column 7: found undefined alias 'nowhere'"),
    ("name: !!python/object/apply:os.system [echo]\n", "bad.yaml: invalid YAML at line 1"),
    ("seed: !!float x\n", "bad.yaml: invalid YAML: a value does not fit its tag (ValueError: could not convert"),
    ("seed: !!bool maybe\n", "bad.yaml: invalid YAML: a value does not fit its tag (KeyError: 'maybe')"),
    ("a: 1\n---\nb: 2\n", "bad.yaml: invalid YAML"),
    ("", "bad.yaml: empty document"),
    ("- 1\n", "bad.yaml: expected a mapping, got list"),
    ("name: t\n" + "#" * (1 << 20), "bad.yaml: larger than 1048576 bytes"),
])
def test_bad_file_is_one_config_error_line(tmp_path, data, message):
    p = write(tmp_path / "bad.yaml", data)
    t = time.perf_counter()
    assert message in one_line_error(load_suite, p)
    assert time.perf_counter() - t < 5  # the alias bomb is counted, never expanded


def test_yaml_merge_keys_and_aliases_stay_valid(tmp_path):
    """A merge key's entry overridden in the same mapping is not a duplicate key; a plain alias is fine."""
    text = ("name: t\nmodels: [tiny-llama]\n"
            "calibration: &cal {dataset: wiki, n_samples: 2, seq_len: 64}\n"
            "cells:\n- {name: a, method: fp, calibration: {<<: *cal, n_samples: 4}}\n"
            "- {name: b, method: fp, calibration: *cal}\n")
    s = load_suite(write(tmp_path / "ok.yaml", text))
    assert [c.calibration.n_samples for c in s.cells] == [4, 2]


def test_a_directory_is_not_a_suite(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    assert one_line_error(load_suite, tmp_path / "d.yaml").endswith("d.yaml: a directory, not a suite file")


def test_only_a_bare_name_falls_back_to_the_builtin_suites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "suite file /x/smoke.yaml not found" in one_line_error(load_suite, "/x/smoke.yaml")
    assert "suite file sub/smoke.yaml not found" in one_line_error(load_suite, "sub/smoke.yaml")
    assert "suite file ./smoke not found" in one_line_error(load_suite, "./smoke")
    for bare in ("smoke", "smoke.yaml"):
        assert load_suite(bare).path == str(SUITES_DIR / "smoke.yaml")
    write(tmp_path / "smoke.yaml", yaml.safe_dump(with_(name="local")))
    assert load_suite("smoke.yaml").name == "local"  # a file here wins over the built-in


@pytest.mark.parametrize("include, message", [
    ("a\0b.yaml", "top.yaml.include: no file 'a\\x00b.yaml' next to top.yaml"),
    ("x" * 5000 + ".yaml", "top.yaml.include: cannot look up"),
    ("sub", "top.yaml.include: no file 'sub' next to top.yaml"),  # a directory
])
def test_bad_include_paths(tmp_path, include, message):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "top.yaml", yaml.safe_dump({**BASE, "include": include}))
    assert message in one_line_error(load_suite, p)


def test_an_included_files_errors_name_it(tmp_path):
    write(tmp_path / "a.yaml", "name: a\nname: b\n")
    p = write(tmp_path / "top.yaml", yaml.safe_dump({**BASE, "include": "a.yaml"}))
    assert "a.yaml: duplicate key 'name' at line 2" in one_line_error(load_suite, p)


def test_shipped_suites_resolve_as_before():
    """Every shipped suite loads, and its resolved form is stable (parse of the merged raw is the same)."""
    for p in sorted(SUITES_DIR.glob("*.yaml")):
        s = load_suite(p)
        assert resolved_yaml(parse_suite(s.raw)) == resolved_yaml(s), p


# --------------------------------------------------------------------------- the CLI


BAD_FILES = {
    "binary": bytes(range(256)),
    "duplicate-key": SUITE_TEXT + "seed: 1\nseed: 2\n",
    "type": SUITE_TEXT.replace("seq_len: 64\n  max_windows", "seq_len: abc\n  max_windows"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_cli_bad_suite_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, command, kind):
    p = write(tmp_path / "bad.yaml", BAD_FILES[kind])
    out = tmp_path / "out"
    assert main([command, str(p), *(["--out", str(out)] if command == "run" else [])]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: bad.yaml") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists() and sorted(q.name for q in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_run_subprocess_bad_suite_exits_2_before_writing(tmp_path):
    p = write(tmp_path / "bad.yaml", BOMB + SUITE_TEXT)
    r = subprocess.run([sys.executable, "-m", "quantbench.harness.cli", "run", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: bad.yaml: the document expands to more than")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- eval batch_size (--batch-size)


@pytest.mark.parametrize("bad, message", [(0, "batch_size must be a positive integer, got 0"),
                                          ("4", "batch_size must be a positive integer"),
                                          (True, "batch_size must be a positive integer"),
                                          (10**9, "batch_size must be at most 1000000")])
def test_eval_batch_size_is_checked(bad, message):
    doc = with_(eval={**BASE["eval"], "batch_size": bad})
    assert message in one_line_error(parse_suite, doc)
    doc = with_(eval=[BASE["eval"], {"dataset": "kjv", "seq_len": 64, "batch_size": bad}])
    assert "suite.eval[1]" in one_line_error(parse_suite, doc)


def test_eval_batch_size_resolves_but_leaves_the_cell_definition_alone():
    """batch_size changes no value (<= 1e-6 relative), so it is not part of what --resume keys a cell on;
    the default (1) resolves as a suite without the key did; --batch-size sets every eval spec's."""
    from quantbench.harness.run.runner import definition_hashes
    from quantbench.harness.run.suite import with_batch_size

    plain = parse_suite(with_())
    four = parse_suite(with_(eval={**BASE["eval"], "batch_size": 4}))
    assert plain.eval.batch_size == 1 and four.eval.batch_size == 4
    assert "batch_size" not in resolved_yaml(plain)
    assert "batch_size: 4" in resolved_yaml(four)
    assert resolved_yaml(parse_suite(with_(eval={**BASE["eval"], "batch_size": 1}))) == resolved_yaml(plain)
    assert definition_hashes(four) == definition_hashes(plain)
    # ... while a field that changes values does change it
    assert definition_hashes(parse_suite(with_(eval={**BASE["eval"], "seq_len": 32}))) != definition_hashes(plain)
    two = parse_suite(with_(eval=[BASE["eval"], {"dataset": "kjv", "seq_len": 64}]))
    set2 = with_batch_size(two, 2)
    assert [e.batch_size for e in set2.evals] == [2, 2] and [e.batch_size for e in two.evals] == [1, 1]
    assert definition_hashes(set2) == definition_hashes(two)
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer"):
        with_batch_size(plain, 0)
