"""``eval:`` as a list (one perplexity record per eval dataset, "ppl <dataset>" leaderboard columns) and
``calibration: {dataset: random}``, on tiny random-init models."""

import copy

import pytest
import yaml

from quantbench.harness.inputs import data
from quantbench.harness.inputs.models import tiny_llama
from quantbench.harness.measure.evaluate import build_eval_data, evaluate
from quantbench.harness.report import leaderboard
from quantbench.harness.run.records import read_records
from quantbench.harness.run.runner import run_suite
from quantbench.harness.run.suite import EvalSpec, parse_suite, resolved_yaml
from quantbench.methods.base import ConfigError

WIKI = {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2}
KJV = {"dataset": "kjv", "protocol": "gptq", "seq_len": 64, "max_windows": 2}
SUITE = {
    "name": "evals",
    "models": ["tiny-llama"],
    "seed": 0,
    "eval": [WIKI, KJV],
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity", "kl_divergence", "bits_per_weight"],
    "cells": [
        {"name": "fp", "method": "fp"},
        {"name": "gptq-random", "method": "gptq", "params": {"bits": 4, "group_size": 64},
         "calibration": {"dataset": "random"}},
    ],
}


def with_eval(ev):
    d = copy.deepcopy(SUITE)
    d["eval"] = ev
    return d


def test_list_eval_parses_primary_first():
    s = parse_suite(SUITE)
    assert s.eval == EvalSpec("wiki", "gptq", 64, None, 2)
    assert s.extra_evals == (EvalSpec("kjv", "gptq", 64, None, 2),)
    assert [e.dataset for e in s.evals] == ["wiki", "kjv"]
    assert yaml.safe_load(resolved_yaml(s))["eval"] == [s.eval.to_dict(), s.extra_evals[0].to_dict()]


def test_single_mapping_eval_is_unchanged():
    s = parse_suite(with_eval(WIKI))
    assert s.extra_evals == () and s.evals == (s.eval,)
    assert yaml.safe_load(resolved_yaml(s))["eval"] == s.eval.to_dict()  # a mapping, as before


@pytest.fixture
def calib_only_corpus(monkeypatch):
    monkeypatch.setitem(data.DATASETS._entries, "calibonly",
                        data.Corpus("calibonly", ("calib",), lambda split: ["x"], "test corpus", "none"))


@pytest.mark.parametrize("ev, message", [
    ([], "suite.eval: eval must be a mapping or a non-empty list of them"),
    ([WIKI, {**KJV, "dataset": "kvj"}], "suite.eval[1]: unknown dataset 'kvj' (did you mean 'kjv'?)"),
    ([WIKI, {**KJV, "dataset": "calibonly"}], "suite.eval[1]: dataset 'calibonly' has no test split"),
    ([WIKI, {**KJV, "dataset": "random"}], "suite.eval[1]: dataset 'random' is random token ids, for calibration"),
    ({**WIKI, "dataset": "random"}, "suite.eval: dataset 'random' is random token ids, for calibration only"),
    ([WIKI, {**WIKI, "max_windows": 3}], "suite.eval[1]: same dataset, protocol and seq_len (wiki/gptq/64) as eval[0]"),
    ([WIKI, {**KJV, "seq_len": 0}], "suite.eval[1]: seq_len must be a positive integer, got 0"),
    ([WIKI, "kjv"], "suite.eval[1]: expected a mapping, got str"),
])
def test_bad_eval_list_is_one_config_error_line(calib_only_corpus, ev, message):
    with pytest.raises(ConfigError) as e:
        parse_suite(with_eval(ev))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_random_calibration_validates():
    s = parse_suite(SUITE)
    assert s.cells[1].calibration.dataset == "random"


def test_one_perplexity_record_per_eval_dataset(tmp_path):
    run_dir = run_suite(parse_suite(SUITE), tmp_path / "run")
    recs = read_records(run_dir / "records.jsonl")
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs if r["status"] != "ok"]
    for cell in ("fp", "gptq-random"):
        ppl = [r for r in recs if r["cell"] == cell and r["metric"] == "perplexity"]
        assert [r["protocol"]["dataset"] for r in ppl] == ["wiki", "kjv"]
        assert [leaderboard.protocol_tag(r) for r in ppl] == ["wiki/gptq/64", "kjv/gptq/64"]
        assert "eval_index" not in ppl[0]["protocol"] and ppl[1]["protocol"]["eval_index"] == 1
        assert ppl[1]["protocol"]["windows"] == 2 and ppl[1]["protocol"]["tokens"] == 2 * 63
        # the reference statistics stay on the primary text only
        assert [r["protocol"]["dataset"] for r in recs if r["cell"] == cell and r["metric"] == "kl_divergence"] \
            == ["wiki"]
    # the fp cell's kjv perplexity is the tiny model's own on the kjv test split, recomputed here
    loaded = tiny_llama()
    ids = data.tokens("kjv", "test", loaded.tokenizer)
    want = evaluate(loaded.model.eval(), build_eval_data(ids, "kjv", "gptq", 64, None, 2)).perplexity
    fp_kjv = next(r for r in recs if r["cell"] == "fp" and r["metric"] == "perplexity"
                  and r["protocol"]["dataset"] == "kjv")
    assert fp_kjv["value"] == pytest.approx(want, rel=1e-6)
    q_kjv = next(r for r in recs if r["cell"] == "gptq-random" and r["metric"] == "perplexity"
                 and r["protocol"]["dataset"] == "kjv")
    assert q_kjv["value"] != fp_kjv["value"]

    md = leaderboard.markdown(recs)
    header = next(line for line in md.splitlines() if line.startswith("|") and "ppl wiki" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols.index("ppl wiki") < cols.index("ppl kjv")  # the primary first
    assert {"ppl wiki", "Δppl wiki", "ppl kjv", "Δppl kjv", "KL"} <= set(cols)


def test_single_eval_leaderboard_keeps_the_plain_ppl_header(tmp_path):
    doc = with_eval(WIKI)
    doc["cells"] = doc["cells"][:1]
    recs = read_records(run_suite(parse_suite(doc), tmp_path / "run") / "records.jsonl")
    assert len([r for r in recs if r["metric"] == "perplexity"]) == 1
    header = next(line for line in leaderboard.markdown(recs).splitlines() if line.startswith("|"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "ppl" in cols and "ppl wiki" not in cols
