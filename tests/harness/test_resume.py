"""Resume: torn writes, partial cells, edited suites, model keys, model load failures, run dir reuse, kill -9."""

import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantbench.harness.cli import main
from quantbench.harness.inputs.models import model_key, tiny_llama
from quantbench.harness.run import runner as runner_mod
from quantbench.harness.run.records import RecordWriter, completed_cells, make_record, read_records
from quantbench.harness.run.runner import RUN_FILES, run_suite
from quantbench.harness.run.suite import parse_suite
from quantbench.methods.base import ConfigError

REPO = Path(__file__).resolve().parents[2]

SUITE = {
    "name": "resume-t",
    "models": ["tiny-llama"],
    "seed": 0,
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity", "kl_divergence", "bits_per_weight"],
    "cells": [
        {"name": "fp", "method": "fp"},
        {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}},
    ],
}


def _suite(**over):
    return parse_suite({**SUITE, **over})


def _keys(recs):
    return [(r["model"]["name"], r["cell"], r["metric"]) for r in recs]


def _values(recs):
    return {k: r["value"] for k, r in zip(_keys(recs), recs)}


def _lines(path):
    text = Path(path).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line is whole JSON


@pytest.fixture
def calls(monkeypatch):
    """The cells the local runner measures, in order."""
    seen = []
    real = runner_mod.CellRunner.run_cell

    def spy(self, cell, run_id, env):
        seen.append(cell.name)
        return real(self, cell, run_id, env)

    monkeypatch.setattr(runner_mod.CellRunner, "run_cell", spy)
    return seen


# --------------------------------------------------------------------------- torn tail


def _cell(name, metrics, started):
    prov = {"seed": 0, "started": started, "seconds": 0.5}
    return [make_record(run_id="r", suite="s", cell=name, model={"name": "m"}, method="fp", method_config={},
                        metric=m, value=1.0, unit="", higher_is_better=None, provenance=prov) for m in metrics]


def _line(rec):
    return (json.dumps(rec) + "\n").encode()


def test_torn_tail_is_moved_aside_before_the_next_append(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    w = RecordWriter(path)
    w.write_cell(_cell("a", ["x", "y"], "t1"))
    torn = _cell("b", ["x", "y", "z"], "t2")  # the crash cut the third record of b's write
    partial = _line(torn[0]) + _line(torn[1]) + _line(torn[2])[:40]
    with open(path, "ab") as f:
        f.write(partial)
    whole = path.read_bytes()
    w2 = RecordWriter(path)  # a new process resumes
    with caplog.at_level(logging.WARNING):
        w2.write_cell(_cell("c", ["x"], "t3"))
    recs = _lines(path)
    assert [(r["cell"], r["metric"]) for r in recs] == [("a", "x"), ("a", "y"), ("c", "x")]
    side = tmp_path / "records.jsonl.torn-1"
    assert side.read_bytes() == partial  # b's complete records go with its fragment: b reruns whole
    assert path.read_bytes() == whole[: len(whole) - len(partial)] + _line(_cell("c", ["x"], "t3")[0])
    assert f"dropped {len(partial)} byte(s)" in caplog.text and "torn-1" in caplog.text


def test_torn_fragment_of_a_new_attempt_keeps_the_complete_cell_before_it(tmp_path):
    path = tmp_path / "records.jsonl"
    w = RecordWriter(path)
    w.write_cell(_cell("a", ["x", "y"], "t1"))
    fragment = _line(_cell("b", ["x"], "t2")[0])[:90]
    assert b'"cell": "b"' in fragment  # the fragment shows it belongs to another cell
    with open(path, "ab") as f:
        f.write(fragment)
    assert RecordWriter(path).repair() == tmp_path / "records.jsonl.torn-1"
    assert [r["cell"] for r in _lines(path)] == ["a", "a"]
    # a second crash: the next side file
    with open(path, "ab") as f:
        f.write(b'{"sch')
    whole = path.read_bytes()
    assert RecordWriter(path).repair() == tmp_path / "records.jsonl.torn-2"
    # a fragment too short to tell its cell: the attempt before it is moved too (a reruns, nothing is lost)
    assert (tmp_path / "records.jsonl.torn-2").read_bytes() == whole
    assert path.read_bytes() == b""


def test_lost_newline_only_is_restored(tmp_path):
    path = tmp_path / "records.jsonl"
    RecordWriter(path).write_cell(_cell("a", ["x", "y"], "t1"))
    path.write_bytes(path.read_bytes()[:-1])
    assert RecordWriter(path).repair() is None
    assert len(_lines(path)) == 2 and not list(tmp_path.glob("*.torn-*"))


@pytest.mark.parametrize("where", ["mid-line", "line-end", "newline"])
def test_resume_after_a_write_cut_mid_cell_reruns_that_cell_once(tmp_path, calls, where):
    suite = _suite()
    run_dir = run_suite(suite, tmp_path / "run")
    path = run_dir / "records.jsonl"
    full = read_records(path)
    data = path.read_bytes()
    r4_start = data.index(b'"cell": "r4"')
    r4_start = data.rfind(b"\n", 0, r4_start) + 1
    cut = r4_start + (len(data) - r4_start) * 2 // 3  # r4's write cut two thirds through ...
    if where != "mid-line":  # ... or at the end of its second record, with or without that record's newline
        cut = data.index(b"\n", data.index(b"\n", r4_start) + 1) + (where == "line-end")
    path.write_bytes(data[:cut])
    run_suite(suite, run_dir, resume=True)
    assert calls == ["fp", "r4", "r4"]
    recs = _lines(path)
    assert sorted(_keys(recs)) == sorted(_keys(full))  # no (cell, metric) twice
    assert _values(recs) == _values(full)
    assert list(run_dir.glob("records.jsonl.torn-*"))


# --------------------------------------------------------------------------- partial cells


def test_cell_with_some_metrics_recorded_is_not_done(tmp_path, calls):
    suite = _suite()
    run_dir = run_suite(suite, tmp_path / "run")
    path = run_dir / "records.jsonl"
    recs = read_records(path)
    kept = [r for r in recs if not (r["cell"] == "fp" and r["metric"] != "perplexity")]  # 1 of fp's 3 metrics
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    run_suite(suite, run_dir, resume=True)
    assert calls == ["fp", "r4", "fp"]
    assert _values(read_records(path)) == _values(recs)


def test_completed_cells_rules():
    recs = [*_cell("a", ["x", "y"], "t1"), *_cell("b", ["x"], "t1")]
    expected = {("m", "a"): (("x", "y"), None), ("m", "b"): (("x", "y"), None)}
    assert completed_cells(recs, expected) == {("m", "a")}  # b lacks y
    failed = _cell("a", ["y"], "t2")
    failed[0]["status"] = "failed"
    assert completed_cells([*recs, *failed], expected) == set()  # the last record of (a, y) failed: retried
    assert completed_cells([*recs, *failed, *_cell("a", ["y"], "t3")], expected) == {("m", "a")}
    # one metric with several records (one per task) in one attempt: all must be ok
    multi = _cell("a", ["x", "x", "y"], "t4")
    multi[0]["status"] = "failed"
    assert completed_cells(multi, {("m", "a"): (("x", "y"), None)}) == set()
    # records measured under another definition of the cell do not count
    for r in recs:
        r["provenance"]["cell_definition"] = "old"
    assert completed_cells(recs, {("m", "a"): (("x", "y"), "new")}) == set()
    assert completed_cells(recs, {("m", "a"): (("x", "y"), "old")}) == {("m", "a")}


# --------------------------------------------------------------------------- edited suite


def test_edited_suite_is_refused_on_resume_unless_forced(tmp_path, calls, caplog):
    run_dir = run_suite(_suite(), tmp_path / "run")
    edited = _suite(cells=[SUITE["cells"][0], {"name": "r4", "method": "rtn", "params": {"bits": 8, "group_size": 64}}])
    with pytest.raises(ConfigError) as e:
        run_suite(edited, run_dir, resume=True)
    assert "tiny-llama/r4 (method)" in str(e.value) and "fp" not in str(e.value) and "--force" in str(e.value)
    assert yaml.safe_load((run_dir / "suite.resolved.yaml").read_text())["cells"][1]["method"][0]["bits"] == 4
    # a change that does not touch what cells measure is no change
    run_suite(_suite(description="edited", tolerances={"perplexity": {"rel": 0.5}}), run_dir, resume=True)
    assert calls == ["fp", "r4"]
    with caplog.at_level(logging.WARNING):
        run_suite(edited, run_dir, resume=True, force=True)
    assert calls == ["fp", "r4", "r4"] and "tiny-llama/r4 (method)" in caplog.text
    assert yaml.safe_load((run_dir / "suite.resolved.yaml").read_text())["cells"][1]["method"][0]["bits"] == 8
    latest = {(r["cell"], r["metric"]): r for r in read_records(run_dir / "records.jsonl")}
    assert latest[("r4", "bits_per_weight")]["method_config"]["bits"] == 8
    assert latest[("r4", "bits_per_weight")]["value"] > 8


def test_forced_rerun_cut_short_is_finished_by_a_plain_resume(tmp_path, calls, monkeypatch):
    cells = [{"name": "fp", "method": "fp"}, {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}},
             {"name": "g4", "method": "gptq", "params": {"bits": 4, "group_size": 64}}]
    run_dir = run_suite(_suite(cells=cells, metrics=["bits_per_weight"]), tmp_path / "run")
    edited = _suite(cells=cells, metrics=["bits_per_weight"], calibration={"dataset": "wiki", "n_samples": 3})
    with pytest.raises(ConfigError) as e:  # only gptq calibrates: fp and rtn did not change
        run_suite(edited, run_dir, resume=True)
    assert "tiny-llama/g4 (calibration)" in str(e.value) and "/fp" not in str(e.value) and "/r4" not in str(e.value)
    spy = runner_mod.CellRunner.run_cell

    def interrupted(self, cell, run_id, env):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod.CellRunner, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the forced rerun of r4 is cut short
        run_suite(edited, run_dir, resume=True, force=True)
    monkeypatch.setattr(runner_mod.CellRunner, "run_cell", spy)
    run_suite(edited, run_dir, resume=True)  # the suite file now says n_samples 3: g4's old records do not count
    assert calls == ["fp", "r4", "g4", "g4"]
    recs = read_records(run_dir / "records.jsonl")
    assert len({r["provenance"]["cell_definition"] for r in recs if r["cell"] == "g4"}) == 2


def test_eval_or_seed_change_names_every_cell_and_cli_exits_2(tmp_path, capsys):
    run_dir = run_suite(_suite(), tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        run_suite(_suite(), run_dir, resume=True, seed=1)
    assert "tiny-llama/fp (seed)" in str(e.value) and "tiny-llama/r4 (seed)" in str(e.value)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**SUITE, "eval": {**SUITE["eval"], "max_windows": 3}}))
    assert main(["run", str(p), "--out", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "tiny-llama/fp (eval)" in err and "tiny-llama/r4 (eval)" in err
    assert main(["run", str(p), "--out", str(tmp_path / "new"), "--force"]) == 2
    assert "--force applies to --resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- model keys and model failures


def test_model_key_is_the_name_the_loader_records():
    assert model_key("tiny-llama") == "tiny-llama"
    assert model_key({"name": "mine", "path": "/m/x.gguf"}) == "mine"
    assert model_key({"path": "/m/SmolLM2.Q4_1.gguf"}) == "SmolLM2.Q4_1"  # load_gguf names it path.stem
    assert model_key({"path": "/m", "gguf_file": "a.gguf"}) != model_key({"path": "/m", "gguf_file": "b.gguf"})
    assert model_key({"path": "/m", "gguf_file": "a.gguf"}) == "a"
    assert model_key({"path": "/models/hf-dir"}) == "hf-dir"


def test_unnamed_gguf_model_resumes_without_rerunning(tmp_path, calls, monkeypatch):
    def fake_load(spec):  # a GGUF loader naming the model otherwise than the spec's key would
        loaded = tiny_llama()
        loaded.info["name"] = "loader-name"
        return loaded

    monkeypatch.setattr(runner_mod, "load_model", fake_load)
    gguf = tmp_path / "weights" / "model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    suite = _suite(models=[{"path": str(gguf)}], metrics=["bits_per_weight"])
    run_dir = run_suite(suite, tmp_path / "run")
    run_suite(suite, run_dir, resume=True)
    assert calls == ["fp", "r4"]  # nothing reran
    recs = read_records(run_dir / "records.jsonl")
    assert {r["model"]["name"] for r in recs} == {"model.Q4_1"} and len(recs) == 2


def test_model_that_fails_to_load_fails_its_cells_and_the_run_goes_on(tmp_path, calls, monkeypatch):
    real_load = runner_mod.load_model

    def load(spec):
        if isinstance(spec, dict) and spec.get("name") == "broken":
            raise RuntimeError(f"cannot read the weights in {spec['path']}")
        return real_load(spec)

    monkeypatch.setattr(runner_mod, "load_model", load)
    broken = {"name": "broken", "path": str(tmp_path / "missing-model")}
    (tmp_path / "missing-model").mkdir()
    (tmp_path / "missing-model" / "config.json").write_text("{}")
    suite = _suite(models=[broken, "tiny-llama"], metrics=["perplexity", "bits_per_weight"])
    run_dir = run_suite(suite, tmp_path / "run")
    recs = read_records(run_dir / "records.jsonl")
    assert calls == ["fp", "r4"]  # tiny-llama's cells, after the broken model
    bad = [r for r in recs if r["model"]["name"] == "broken"]
    assert sorted((r["cell"], r["metric"]) for r in bad) == [
        ("fp", "bits_per_weight"), ("fp", "perplexity"), ("r4", "bits_per_weight"), ("r4", "perplexity")]
    assert all(r["status"] == "failed" and "missing-model" in r["error"] and r["value"] is None for r in bad)
    assert bad[0]["error"].startswith("RuntimeError: cannot read the weights")
    good = [r for r in recs if r["model"]["name"] == "tiny-llama"]
    assert len(good) == 4 and all(r["status"] == "ok" for r in good)
    run_suite(suite, run_dir, resume=True)  # the broken model's cells are retried, tiny-llama's are done
    assert calls == ["fp", "r4"]
    assert len(read_records(run_dir / "records.jsonl")) == 12


def test_two_models_under_one_key_are_refused(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.gguf").write_bytes(b"GGUF")
    models = ({"path": str(tmp_path / "a" / "m.gguf")}, {"path": str(tmp_path / "b"), "gguf_file": "m.gguf"})
    assert model_key(models[0]) == model_key(models[1]) == "m"
    with pytest.raises(ConfigError, match="share a name"):  # a Suite built without parse_suite's check
        run_suite(dataclasses.replace(_suite(), models=models), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- run directory reuse


@pytest.mark.parametrize("held", RUN_FILES)
def test_new_run_refuses_a_directory_holding_a_run(tmp_path, held, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / held).write_text("precious\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_suite(_suite(), d)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(SUITE))
    assert main(["run", str(p), "--out", str(d)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert [f.name for f in d.iterdir()] == [held] and (d / held).read_text() == "precious\n"


def test_new_run_into_an_empty_or_missing_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod.CellRunner, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(runner_mod.CellRunner, "run_cell", lambda self, cell, run_id, env: [])
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "missing" / "deeper"):
        assert run_suite(_suite(), d) == d
        assert (d / "suite.resolved.yaml").exists() and (d / "env.json").exists()


# --------------------------------------------------------------------------- kill -9 (acceptance)

KILL_SUITE = {
    "name": "resume-kill",
    "models": ["tiny-llama"],
    "seed": 0,
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 4, "seq_len": 64},
    "metrics": ["perplexity", "kl_divergence", "top1_agreement", "bits_per_weight", "weight_bytes"],
    "cells": [
        {"name": "fp", "method": "fp"},
        {"name": "rtn-w4g64", "method": "rtn", "params": {"bits": 4, "group_size": 64}},
        {"name": "gptq-w4g64", "method": "gptq", "params": {"bits": 4, "group_size": 64}},
        {"name": "kv-uniform-4", "method": "kv-uniform", "params": {"bits": 4}},
    ],
}
DETERMINISTIC = ("perplexity", "kl_divergence", "top1_agreement", "bits_per_weight", "weight_bytes")


def _cli(suite: Path, out: Path, log: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quantbench.harness.cli", "run", str(suite), "--out", str(out),
           *(["--resume"] if resume else [])]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _wait_until(proc: subprocess.Popen, done, timeout: float = 300.0) -> float | None:
    """Seconds until ``done()`` holds (polled), None if the process ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if done():
            return time.monotonic() - t0
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError("the run neither progressed nor ended")


def _n_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    """kill -9 at seeded random points (start-up, model loading, inside a cell, between cells, the report),
    10 times with --resume, then --resume to the end: exactly the records of an uninterrupted run."""
    suite = tmp_path / "kill.yaml"
    suite.write_text(yaml.safe_dump(KILL_SUITE, sort_keys=False))
    n_records = len(KILL_SUITE["cells"]) * len(KILL_SUITE["metrics"])

    # the uninterrupted run, timed: until its first cell starts, and until its last cell is written (then
    # it is stopped: what comes after, the leaderboard, writes no record)
    log = tmp_path / "ref.log"
    ref = _cli(suite, tmp_path / "ref", log, resume=False)
    first_cell = _wait_until(ref, lambda: b"cell tiny-llama / " in log.read_bytes())
    cells_phase = _wait_until(ref, lambda: _n_lines(tmp_path / "ref" / "records.jsonl") >= n_records)
    assert first_cell is not None and cells_phase is not None, log.read_text()[-3000:]
    if ref.poll() is None:
        os.killpg(ref.pid, signal.SIGKILL)
    assert ref.wait(timeout=60) in (0, -signal.SIGKILL), log.read_text()[-3000:]
    expected = read_records(tmp_path / "ref" / "records.jsonl")
    assert len(expected) == n_records and all(r["status"] == "ok" for r in expected)

    rng = random.Random(20240917)
    out, story, cuts = tmp_path / "run", [], 0
    for i in range(10):
        path = out / "records.jsonl"
        before, before_bytes = _n_lines(path), path.stat().st_size if path.exists() else 0
        log = tmp_path / f"resume-{i}.log"
        proc = _cli(suite, out, log, resume=i > 0)
        delay: float | None = rng.uniform(0.2, 1.0) * first_cell  # start-up, loading, or nothing left to do
        if before < n_records and rng.random() < 0.8:  # or anywhere from the first cell it runs to its last write
            delay = _wait_until(proc, lambda log=log: b"cell tiny-llama / " in log.read_bytes())
            delay = None if delay is None else rng.uniform(0.0, 0.8 * cells_phase)
        try:
            proc.wait(timeout=delay)
            what = "ended"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            what = "killed"
        rc = proc.wait(timeout=60)
        assert rc in (0, -signal.SIGKILL), f"resume {i} exited {rc}:\n{log.read_text()[-3000:]}"
        story.append(f"{i}: {what} ({before} -> {_n_lines(path)} lines)")
        size = path.stat().st_size if path.exists() else 0
        if what == "killed" and size > before_bytes + 1 and (not cuts or rng.random() < 0.4):
            # the kill landing inside a write (too short a window to hit by time): any byte prefix of the
            # appends is a state a kill reaches, so cut what this resume wrote at a random byte
            cut = rng.randrange(before_bytes + 1, size)
            with open(path, "r+b") as f:
                f.truncate(cut)
            story[-1] += f", cut at byte {cut - before_bytes} of {size - before_bytes} written"
            cuts += 1
    log = tmp_path / "final.log"
    final = _cli(suite, out, log, resume=True)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    print("; ".join(story))
    assert any("killed" in s for s in story) and cuts >= 1, story

    recs = _lines(out / "records.jsonl")  # every line whole JSON
    keys = _keys(recs)
    assert len(keys) == len(set(keys)), f"a (model, cell, metric) recorded twice: {story}"
    assert sorted(keys) == sorted(_keys(expected))
    assert all(r["status"] == "ok" for r in recs)
    got, want = _values(recs), _values(expected)
    for k in want:
        if k[2] in DETERMINISTIC:
            assert got[k] == want[k], k
