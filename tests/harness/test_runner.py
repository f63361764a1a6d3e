"""Runner: records' contents, a failing cell recorded while the run goes on, resume, interruption."""

import json

import pytest
import yaml

from quantbench.harness.run import runner as runner_mod
from quantbench.harness.run.records import read_records
from quantbench.harness.run.runner import run_suite
from quantbench.harness.run.suite import parse_suite
from quantbench.methods import base
from quantbench.methods.fp import FPConfig


class Boom(base.Method):
    name = "boom"
    config_cls = FPConfig

    def quantize(self, model, calib):
        raise RuntimeError("boom at quantize")


@pytest.fixture(autouse=True)
def _boom_method(monkeypatch):
    monkeypatch.setitem(base.METHODS._entries, "boom", Boom)

SUITE = {
    "name": "t",
    "models": ["tiny-llama"],
    "seed": 0,
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity", "kl_divergence", "top1_agreement", "bits_per_weight"],
    "cells": [
        {"name": "fp", "method": "fp"},
        # quantize raises: the cell is recorded as failed
        {"name": "broken", "method": "boom"},
        {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}},
    ],
}


def test_records_failed_cell_and_continues(tmp_path):
    run_dir = run_suite(parse_suite(SUITE), tmp_path / "run")
    recs = read_records(run_dir / "records.jsonl")
    assert len(recs) == 3 * 4
    by = {(r["cell"], r["metric"]): r for r in recs}
    assert by[("broken", "perplexity")]["status"] == "failed"
    broken = by[("broken", "perplexity")]
    assert broken["error"] == "RuntimeError: boom at quantize" and broken["value"] is None
    assert by[("fp", "kl_divergence")]["value"] == pytest.approx(0.0, abs=1e-6)
    assert by[("fp", "top1_agreement")]["value"] == 1.0
    r4 = by[("r4", "perplexity")]
    assert r4["status"] == "ok" and r4["value"] > 1
    assert r4["protocol"]["name"] == "gptq" and r4["protocol"]["seq_len"] == 64 and r4["protocol"]["windows"] == 2
    assert r4["protocol"]["tokens"] == 2 * 63
    assert r4["method_config"] == {"method": "rtn", "bits": 4, "group_size": 64, "sym": False,
                                   "include": ["*"], "exclude": ["lm_head", "*embed*", "*wte*", "*wpe*"],
                                   "version": 1}
    assert by[("r4", "bits_per_weight")]["value"] == pytest.approx(4 + 8 * 2.5 / 64)
    prov = r4["provenance"]
    for k in ("git_sha", "dirty", "versions", "hardware", "threads", "seed", "started", "seconds"):
        assert k in prov
    assert prov["versions"]["torch"].startswith("2.13")
    assert r4["model"]["name"] == "tiny-llama" and r4["model"]["params"] > 0
    for f in ("suite.resolved.yaml", "env.json"):
        assert (run_dir / f).exists()
    assert yaml.safe_load((run_dir / "suite.resolved.yaml").read_text())["cells"][2]["method"][0]["bits"] == 4


def test_deterministic_perplexities(tmp_path):
    a = read_records(run_suite(parse_suite(SUITE), tmp_path / "a") / "records.jsonl")
    b = read_records(run_suite(parse_suite(SUITE), tmp_path / "b") / "records.jsonl")
    pa = [r["value"] for r in a if r["metric"] == "perplexity"]
    assert pa == [r["value"] for r in b if r["metric"] == "perplexity"]


def test_interrupt_keeps_finished_cells_and_resume_skips_them(tmp_path, monkeypatch):
    suite = parse_suite(SUITE)
    calls = []
    real = runner_mod.CellRunner.run_cell

    def flaky(self, cell, run_id, env):
        calls.append(cell.name)
        if cell.name == "r4" and len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, cell, run_id, env)

    monkeypatch.setattr(runner_mod.CellRunner, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, tmp_path / "run")
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert {r["cell"] for r in recs} == {"fp", "broken"}
    with pytest.raises(FileExistsError):
        run_suite(suite, tmp_path / "run")
    run_suite(suite, tmp_path / "run", resume=True)
    # resume skips fp (ok), retries broken (failed), runs r4 (missing)
    assert calls[3:] == ["broken", "r4"]
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len({r["run_id"] for r in recs}) == 1
    assert sorted({r["cell"] for r in recs}) == ["broken", "fp", "r4"]
    # a torn last line (crash mid-write) is ignored on read
    with open(tmp_path / "run" / "records.jsonl", "a") as f:
        f.write('{"schema": 1, "cell": "x"')
    assert len(read_records(tmp_path / "run" / "records.jsonl")) == len(recs)
    json.dumps(recs)
