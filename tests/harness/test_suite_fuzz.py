"""Property-based: the shipped suites, mutated (types, ranges, structure, dropped and duplicated keys, YAML
tricks in the text), either load or raise one ConfigError line; never any other exception (issue U)."""

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantbench.harness.measure import tasks as tasks_module
from quantbench.harness.paths import SUITES_DIR
from quantbench.harness.run.suite import load_suite, parse_suite, resolved_yaml
from quantbench.methods.base import ConfigError

SHIPPED = ("smoke.yaml", "default.yaml")
TEXTS = {name: (SUITES_DIR / name).read_bytes() for name in SHIPPED}
DOCS = {name: yaml.safe_load(text) for name, text in TEXTS.items()}
FAST = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# names a mutation may put where a name belongs: valid ones of another block, near misses, paths, junk
NAMES = ["", " ", "wiki", "c4", "gptq", "sliding", "rtn", "fp", "mixed", "kvquant", "perplexity", "accuracy",
         "tiny-llama", "smollm2-135m", "ray", "local", "auto", "float33", "bfloat16", "Q4_K_M", "fisher-kl",
         "wiki_cloze", "hellaswag", "..", "a/b", "/nonexistent", "~nouser/x", "x" * 300, "a\nb", "a\0b", "é"]
KEYS = ["name", "models", "seed", "eval", "calibration", "metrics", "cells", "tolerances", "resources",
        "tasks", "latency", "executor", "include", "method", "params", "dataset", "seq_len", "n_samples",
        "max_windows", "stride", "protocol", "bits", "group_size", "rel", "abs", "recovery", "limit", "path",
        "dtype", "num_cpus", "memory", "address", "description", "<<"]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 64, 128, 2**32 - 1, 2**32, 2**63, 10**6, 10**6 + 1, 10**25, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(NAMES),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4), st.integers(),
                                                      st.none(), st.booleans()), inner, max_size=3)),
    max_leaves=8,
)


@pytest.fixture(scope="module", autouse=True)
def _fixed_lmeval_task_names():
    """An unknown task name asks lm-eval's task registry (about 10 s to build); a fixed set stands in."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks_module, "_lmeval_task_names", lambda: {"hellaswag", "arc_easy"})
        yield


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document: () is the document, then each mapping key and list index, depth first."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _mutate(doc: Any, path: tuple, op: str, value: Any, key: Any) -> Any:
    if not path:
        return value if op == "set" else [doc] if op == "wrap" else doc
    parent, last = _get(doc, path[:-1]), path[-1]
    old = parent[last]
    if op == "set":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.insert(last, copy.deepcopy(old))
        else:
            parent[key if key != last else f"{last}_"] = copy.deepcopy(old)
    elif op == "wrap":
        parent[last] = [old]
    elif op == "unwrap":
        parent[last] = (old[0] if old else None) if isinstance(old, list) else \
            next(iter(old.values()), None) if isinstance(old, dict) else old
    elif op == "stringify":
        parent[last] = str(old)
    elif op == "add_key" and isinstance(old, dict):
        old[key] = value
    return doc


@st.composite
def mutated_docs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(DOCS[draw(st.sampled_from(SHIPPED))])
    for _ in range(draw(st.integers(1, 3))):
        places = _paths(doc)
        path = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["set", "set", "delete", "duplicate", "wrap", "unwrap", "stringify", "add_key"]))
        doc = _mutate(doc, path, op, draw(values), draw(st.one_of(st.sampled_from(KEYS), scalars)))
    return doc


def _check(load: Any, *args: Any) -> None:
    """The property: a suite loads (and its resolved form can be written) or is one ConfigError line."""
    try:
        suite = load(*args)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return
    resolved_yaml(suite)


@FAST
@given(mutated_docs())
def test_mutated_documents_load_or_are_one_config_error_line(doc):
    _check(parse_suite, doc)  # as the Python API and the Ray workers hand it over: not necessarily YAML-writable


TRICKS = [
    "x: &a [1, 2, 3]", "y: *a", "<<: *a", "z: &b [*b]", "w: *undefined", "---", "...", "%YAML 1.1",
    "? [a, b]\n: 1", "? {a: 1}\n: 2", "name: !!python/object/apply:os.system [echo hi]", "seed: !!binary aGk=",
    "seed: 0x10", "seed: 1_000", "seed: .inf", "seed: .nan", "seed: 2001-12-14", "seed: !!float 1", "seed: !!float x",
    "seed: !!bool maybe", "seed: !!timestamp 2001-13-45",
    "eval: {seq_len: 1e3}", "name: 'unterminated", "name: \"a\\x00b\"", "\tseed: 1", "seed:\t1", "- 1",
    "cells: *a", "models: {a: 1}", "name: !!set {a, b}", "include: default.yaml", "include: [../smoke.yaml]",
    "a: &c [x, x, x, x, x, x, x, x, x, x]\nb: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &f [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f]",
    "  - {name: fp, method: fp}", "  - {name: fp2, method: fp, method: rtn}", "metrics: [perplexity, perplexity]",
]


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    text = TEXTS[draw(st.sampled_from(SHIPPED))]
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split(b"\n")
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["dup_line", "del_line", "trick", "trick", "bytes", "truncate", "tab", "swap",
                                   "indent", "number"]))
        if op == "dup_line":  # a key given twice, in text form, at the top level or inside a block
            lines.insert(i, lines[i])
        elif op == "del_line":
            del lines[i]
        elif op == "trick":
            lines.insert(i, draw(st.sampled_from(TRICKS)).encode())
        elif op == "bytes":  # not UTF-8, control characters, a BOM
            pos = draw(st.integers(0, len(text)))
            junk = draw(st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from([b"\xef\xbb\xbf", b"\x00"])))
            lines = (text[:pos] + junk + text[pos:]).split(b"\n")
        elif op == "truncate":
            lines = text[: draw(st.integers(0, len(text)))].split(b"\n")
        elif op == "tab":
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + b"\t" + lines[i][pos:]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = b" " * draw(st.integers(1, 4)) + lines[i]
        elif op == "number":
            num = draw(st.sampled_from(["0", "-5", "4.5", "1e400", "-.inf", ".nan", "99999999999999999999999",
                                        "0o17", "true", "null", "'8'", "[]", "{}"]))
            lines[i] = lines[i].replace(b"8", num.encode(), 1).replace(b"0", num.encode(), 1)
        text = b"\n".join(lines)
    return text


@FAST
@given(mutated_texts())
def test_mutated_files_load_or_are_one_config_error_line(workdir, text):
    p = workdir / "fuzz.yaml"
    p.write_bytes(text)
    _check(load_suite, p)


def test_cli_validate_bad_suite_is_one_stderr_line_exit_2(tmp_path):
    """The command itself, as a user runs it: exit status 2, one ``error:`` line, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(TEXTS["smoke.yaml"].replace(b"seq_len: 128", b"seq_len: 0", 1) + b"\nseed: 1\nseed: 1\n")
    exe = Path(sys.executable).with_name("quantbench")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "quantbench.harness.cli"]
    r = subprocess.run([*cmd, "validate", str(bad)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert r.stderr.startswith("error: bad.yaml: duplicate key 'seed' at line")
