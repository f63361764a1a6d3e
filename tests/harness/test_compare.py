"""`quantbench compare` / `baseline update`: a degraded method fails the gate naming cell and metric, an
identical rerun passes, missing cells fail, timing tolerances are skipped across hardware."""

import copy
import json
import math
import random
import re

import numpy as np
import pytest

from quantbench.harness.cli import main
from quantbench.harness.measure import METRICS, PARAM_BLOCKS, MetricSpec
from quantbench.harness.report import compare as cmp_mod
from quantbench.harness.report.compare import (
    IMPROVED,
    MISSING,
    NEW,
    OK,
    REGRESSION,
    SKIPPED,
    baseline_records,
    compare_records,
    default_tolerances,
    load_tolerances,
    noise_of,
    to_markdown,
    update_baseline,
)
from quantbench.harness.run.records import VOLATILE_PROVENANCE, RecordWriter, read_records
from quantbench.harness.run.runner import run_suite
from quantbench.harness.run.suite import parse_suite
from quantbench.methods.base import ConfigError

from .fake_records import cell, hardware, paired_cell, rec

TOL = {"perplexity": {"rel": 0.001}, "kl_divergence": {"rel": 0.05, "abs": 1e-5}, "top1_agreement": {"abs": 0.01},
       "bits_per_weight": {"rel": 0.0}}


def _suite(rtn_bits: int) -> dict:
    return {
        "name": "cmp",
        "models": ["tiny-llama"],
        "seed": 0,
        "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
        "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
        "metrics": ["perplexity", "kl_divergence", "top1_agreement", "bits_per_weight"],
        "tolerances": TOL,
        "cells": [
            {"name": "fp", "method": "fp"},
            # the degraded run keeps the cell name and quantizes to fewer bits
            {"name": "rtn-w4g64", "method": "rtn", "params": {"bits": rtn_bits, "group_size": 64}},
        ],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    base = run_suite(parse_suite(_suite(4)), root / "base")
    baseline = update_baseline(base, out=root / "baselines" / "cmp.jsonl")
    rerun = run_suite(parse_suite(_suite(4)), root / "rerun")
    degraded = run_suite(parse_suite(_suite(3)), root / "degraded")
    return {"root": root, "base": base, "baseline": baseline, "rerun": rerun, "degraded": degraded}


def test_degraded_method_fails_naming_cell_and_metric(runs, capsys):
    out_json = runs["root"] / "deg.json"
    rc = main(["compare", str(runs["baseline"]), str(runs["degraded"]), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 1
    regressions = out.split("### Regressions")[1].split("###")[0]
    for metric in ("perplexity", "kl_divergence", "top1_agreement"):
        assert f"`tiny-llama/rtn-w4g64` **{metric}** [wiki/gptq/64]" in regressions
    assert "fp`" not in regressions  # the unchanged fp cell passes
    assert "bits: 4 → 3" in out  # the config change is named
    summary = json.loads(out_json.read_text())
    assert summary["passed"] is False
    rows = {(r["cell"], r["metric"]): r for r in summary["rows"]}
    assert rows[("rtn-w4g64", "perplexity")]["result"] == REGRESSION
    assert rows[("rtn-w4g64", "perplexity")]["current"] > rows[("rtn-w4g64", "perplexity")]["baseline"] * 1.01
    assert rows[("rtn-w4g64", "bits_per_weight")]["result"] == IMPROVED  # fewer bits is better on that axis
    assert rows[("fp", "perplexity")]["result"] == OK and rows[("fp", "perplexity")]["delta"] == 0


def test_identical_rerun_passes(runs, capsys):
    rc = main(["compare", str(runs["baseline"]), str(runs["rerun"])])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("## quantbench compare: PASS")
    assert "8 metric comparisons, 0 failing: 8 ok" in out
    # and a run directory as the baseline works the same way
    assert main(["compare", str(runs["base"]), str(runs["rerun"])]) == 0


def test_baseline_update_strips_volatile_and_is_deterministic(runs, tmp_path):
    text = runs["baseline"].read_text()
    recs = [json.loads(line) for line in text.splitlines()]
    assert len(recs) == 2 * 4
    for r in recs:
        assert r["run_id"] == "baseline:cmp"
        assert not set(VOLATILE_PROVENANCE) & set(r["provenance"])
        assert r["provenance"]["hardware"]["cpu"] and r["provenance"]["threads"]
    keys = [(r["model"]["name"], r["cell"], r["metric"]) for r in recs]
    assert keys == sorted(keys)
    # the rerun makes the same bytes: only volatile fields differ between the runs
    again = update_baseline(runs["rerun"], out=tmp_path / "again.jsonl")
    assert again.read_text() == text
    # shuffled input, same output
    shuffled = read_records(runs["rerun"] / "records.jsonl")
    random.Random(1).shuffle(shuffled)
    assert [json.dumps(r, sort_keys=True) for r in baseline_records(shuffled)[1]] == text.splitlines()


def test_baseline_update_cli_writes_suite_file(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmp_mod, "BASELINES_DIR", tmp_path / "b")
    assert main(["baseline", "update", str(runs["base"])]) == 0
    assert (tmp_path / "b" / "cmp.jsonl").read_text() == runs["baseline"].read_text()
    # a baseline name resolves to results/baselines/<name>.jsonl
    assert main(["compare", "cmp", str(runs["rerun"])]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------ synthetic records (fast)
BASE = (cell("fp", {"perplexity": 20.0, "top1_agreement": 1.0, "bits_per_weight": 16.0}, method="fp")
        + cell("rtn-w4", {"perplexity": 22.0, "top1_agreement": 0.90, "bits_per_weight": 4.5}, method="rtn")
        + cell("rtn-w8", {"perplexity": 20.1, "top1_agreement": 0.99, "bits_per_weight": 8.2}, method="rtn"))


def _with(records, cell_name, metric, **changes):
    out = copy.deepcopy(records)
    for r in out:
        if r["cell"] == cell_name and r["metric"] == metric:
            r.update(changes)
    return out


def _rows(c):
    return {(r.cell, r.metric): r for r in c.rows}


def test_direction_aware_tolerances():
    tol = {"perplexity": {"rel": 0.01}, "top1_agreement": {"abs": 0.02}, "bits_per_weight": {"rel": 0.0}}
    cur = _with(BASE, "rtn-w4", "perplexity", value=22.2)  # +0.9 %: inside rel 0.01
    cur = _with(cur, "rtn-w4", "top1_agreement", value=0.95)  # higher is better: improved
    cur = _with(cur, "rtn-w8", "top1_agreement", value=0.96)  # -0.03 > abs 0.02: regression
    cur = _with(cur, "rtn-w8", "perplexity", value=19.0)  # lower is better: improved
    c = compare_records(BASE, cur, tol)
    rows = _rows(c)
    assert rows[("rtn-w4", "perplexity")].result == OK
    assert rows[("rtn-w4", "top1_agreement")].result == IMPROVED
    assert rows[("rtn-w8", "top1_agreement")].result == REGRESSION
    assert rows[("rtn-w8", "perplexity")].result == IMPROVED
    assert c.failed and [(r.cell, r.metric) for r in c.regressions] == [("rtn-w8", "top1_agreement")]
    c2 = compare_records(BASE, _with(BASE, "rtn-w4", "perplexity", value=22.23), tol)
    assert _rows(c2)[("rtn-w4", "perplexity")].result == REGRESSION  # +1.05 % > 1 %


def test_missing_cells_and_metrics_are_reported():
    cur = [r for r in BASE if r["cell"] != "rtn-w8" and not (r["cell"] == "rtn-w4" and r["metric"] == "top1_agreement")]
    cur += cell("gptq-w4", {"perplexity": 21.0}, method="gptq")
    c = compare_records(BASE, cur, default_tolerances())
    assert c.missing_cells == ["tiny-llama/rtn-w8"] and c.new_cells == ["tiny-llama/gptq-w4"]
    assert _rows(c)[("rtn-w4", "top1_agreement")].result == MISSING
    assert c.failed
    md = to_markdown(c)
    assert "`tiny-llama/rtn-w8`: cell missing from the current run" in md
    assert "`tiny-llama/rtn-w4` **top1_agreement**" in md
    assert "New cells (not in the baseline): `tiny-llama/gptq-w4`" in md
    allowed = compare_records(BASE, cur, default_tolerances(), allow_missing=True)
    assert not allowed.failed and "Missing cells (allowed): `tiny-llama/rtn-w8`" in to_markdown(allowed)


def test_failed_metric_is_a_regression_and_recovered_failure_an_improvement():
    cur = _with(BASE, "rtn-w4", "perplexity", value=None, status="failed", error="RuntimeError: nan")
    c = compare_records(BASE, cur, default_tolerances())
    r = _rows(c)[("rtn-w4", "perplexity")]
    assert r.result == REGRESSION and "RuntimeError: nan" in r.note
    back = compare_records(cur, BASE, default_tolerances())
    assert _rows(back)[("rtn-w4", "perplexity")].result == IMPROVED and not back.failed


def test_latency_tolerance_applies_only_on_same_hardware():
    base = BASE + cell("rtn-w4", {"decode_ms_per_token": 10.0}, method="rtn")
    slower = _with(base, "rtn-w4", "decode_ms_per_token", value=13.0)  # +30 % > rel 0.15
    c = compare_records(base, slower, default_tolerances())
    assert _rows(c)[("rtn-w4", "decode_ms_per_token")].result == REGRESSION
    assert _rows(compare_records(base, _with(base, "rtn-w4", "decode_ms_per_token", value=11.0),
                                 default_tolerances()))[("rtn-w4", "decode_ms_per_token")].result == OK
    other = _with(slower, "rtn-w4", "decode_ms_per_token", provenance=hardware(cpu="Intel Xeon", threads=8))
    c2 = compare_records(base, other, default_tolerances())
    row = _rows(c2)[("rtn-w4", "decode_ms_per_token")]
    assert row.result == SKIPPED and not c2.failed
    assert any("hardware differs" in w and "Intel Xeon" in w and "AMD EPYC" in w for w in c2.warnings)
    assert "hardware differs" in to_markdown(c2)
    # quality metrics are still compared across hardware
    other_q = _with(other, "rtn-w4", "perplexity", value=30.0, provenance=hardware(cpu="Intel Xeon"))
    assert _rows(compare_records(base, other_q, default_tolerances()))[("rtn-w4", "perplexity")].result == REGRESSION


def test_accuracy_recovery_against_fp():
    base = (cell("fp", {"accuracy": 0.60}, method="fp") + cell("gptq-w4", {"accuracy": 0.58}, method="gptq")
            + cell("rtn-w2", {"accuracy": 0.50}, method="rtn"))
    tol = {"accuracy": {"recovery": 0.95}}
    c = compare_records(base, base, tol)
    rows = _rows(c)
    assert rows[("gptq-w4", "accuracy")].result == OK and "recovery 0.9667" in rows[("gptq-w4", "accuracy")].note
    assert rows[("rtn-w2", "accuracy")].result == REGRESSION  # 0.50 / 0.60 = 0.833 < 0.95, even unchanged
    assert "recovery 0.8333 < 0.95 of fp" in rows[("rtn-w2", "accuracy")].note
    no_fp = [r for r in base if r["cell"] != "fp"]
    c2 = compare_records(no_fp, no_fp, tol)
    assert not c2.failed and any("no fp row" in w for w in c2.warnings)


def test_metrics_match_by_protocol():
    other = dict(rec("rtn-w4", "perplexity", 22.0)["protocol"], seq_len=128)
    cur = _with(BASE, "rtn-w4", "perplexity", protocol=other, value=99.0)
    c = compare_records(BASE, cur, default_tolerances())
    by = {(r.cell, r.metric, r.protocol): r.result for r in c.rows}
    assert by[("rtn-w4", "perplexity", "wiki/gptq/64")] == MISSING  # never compared with the seq_len 128 number
    assert by[("rtn-w4", "perplexity", "wiki/gptq/128")] == NEW
    # same tag, different text: compared, with a warning
    changed = _with(BASE, "rtn-w4", "perplexity", protocol=dict(other, seq_len=64, text_sha256="zzz"))
    c2 = compare_records(BASE, changed, default_tolerances())
    assert any("text_sha256: 'abc' → 'zzz'" in w for w in c2.warnings) and not c2.failed


def test_renamed_cell_matched_by_config():
    cfg = {"method": "rtn", "bits": 4, "group_size": 128, "version": 1}
    base = cell("rtn-w4", {"perplexity": 22.0}, method="rtn", config=cfg)
    cur = cell("rtn-w4g128", {"perplexity": 22.0}, method="rtn", config=cfg)
    c = compare_records(base, cur, default_tolerances())
    assert not c.missing_cells and not c.new_cells and not c.failed
    assert c.rows[0].note == "renamed from rtn-w4" and c.rows[0].baseline_cell == "rtn-w4"


def test_every_metric_is_in_the_gate_with_the_facts_of_its_spec():
    assert sorted(default_tolerances()) == METRICS.names() and len(METRICS) >= 12
    assert default_tolerances()["kl_divergence"] == {"rel": 0.10, "abs": 1e-4}
    assert {n for n, s in METRICS.items() if s.hardware_bound} == {
        "quantize_seconds", "prefill_tokens_per_s", "decode_ms_per_token", "energy_j_per_token", "peak_memory_bytes"}
    assert {s.params for _, s in METRICS.items()} == {None, *PARAM_BLOCKS.names()}  # every block it reads exists
    with pytest.raises(ConfigError, match=r"metric x: tolerance: unknown key 'relative'"):
        MetricSpec("x", lambda ctx: [], "u", None, "x", 99, {"relative": 0.1})


def test_tolerances_from_suite_and_validation(tmp_path):
    tol, src = load_tolerances("smoke")
    assert src.endswith("suites/smoke.yaml") and tol["perplexity"] == {"rel": 0.001}
    assert tol["weight_bytes"] == default_tolerances()["weight_bytes"]  # defaults fill the rest
    bad = tmp_path / "bad.yaml"
    bad.write_text("tolerances:\n  perplexity: {relative: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'relative'; valid: abs, recovery, rel"):
        load_tolerances(str(bad))
    bad.write_text("perplexyty: {rel: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown metric 'perplexyty'"):
        load_tolerances(str(bad))
    bad.write_text("accuracy: {recovery: 1.5}\n")
    with pytest.raises(ConfigError, match="recovery"):
        load_tolerances(str(bad))


def test_cli_exit_codes_and_json(tmp_path, capsys):
    b, c = tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    RecordWriter(b).write_cell(BASE)
    RecordWriter(c).write_cell(_with(BASE, "rtn-w4", "perplexity", value=25.0))
    tol = tmp_path / "tol.yaml"
    tol.write_text("tolerances:\n  perplexity: {rel: 0.05}\n")
    assert main(["compare", str(b), str(b), "--tolerances", str(tol)]) == 0
    assert main(["compare", str(b), str(c), "--tolerances", str(tol), "--json", str(tmp_path / "s.json")]) == 1
    out = capsys.readouterr().out
    assert "`tiny-llama/rtn-w4` **perplexity** [wiki/gptq/64]: 22 → 25 (+13.64%)" in out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["passed"] is False and s["regressions"] == 1 and s["tolerances"] == str(tol)
    assert main(["compare", str(tmp_path / "nope"), str(b)]) == 2


def test_markdown_diff_escapes_names(tmp_path):
    """Cell, model and protocol text from records never breaks the diff's table or injects HTML into a PR comment."""
    hostile = {"a|b": "rtn", "<script>x</script>": "rtn", "tick`s\nnl": "rtn"}
    base = [r for name, m in hostile.items()
            for r in cell(name, {"perplexity": 22.0, "bits_per_weight": 4.5}, method=m, model="<b>m|</b>",
                          config={"method": m, "name": name})]
    cur = copy.deepcopy(base)
    for r in cur:
        if r["metric"] == "perplexity":
            r["value"] = 30.0
            r["protocol"] = dict(r["protocol"], text_sha256="<i>|")
    md = to_markdown(compare_records(base, cur, TOL))
    outside_code = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", md)
    assert "<script" not in outside_code and "<b>" not in outside_code and "<i>" not in outside_code
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 2 * len(hostile)
    for ln in rows:  # 12 columns: an unescaped | would add one
        assert len(re.findall(r"(?<!\\)\|", ln.replace("\\\\", ""))) == 13, ln
    assert "| &lt;b&gt;m\\|&lt;/b&gt; | a\\|b | perplexity |" in md
    assert "- `<b>m|</b>/a|b` **perplexity**" in md  # a code span outside a table is literal as it is
    assert "- ``<b>m|</b>/tick`s nl`` **perplexity**" in md


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10**400, -0.1, True, "0.1"])
def test_a_tolerance_must_be_a_finite_number(value):
    from quantbench.harness.measure.base import check_tolerance
    from quantbench.methods.base import ConfigError

    with pytest.raises(ConfigError, match="expected a number >= 0"):
        check_tolerance("tolerances.perplexity", {"rel": value})


# ------------------------------------------------------------------ noise: the tolerance gate decides, noise informs
def test_compare_adds_paired_noise_information_and_keeps_the_gate():
    fs = [1.0, 0.0] * 50
    base = paired_cell("fp", 15.0, 0.7, 0.0, 0.0, fs, method="fp") + paired_cell(
        "rtn-w4", 16.0, 0.8, math.log(16 / 15), 0.004, fs, method="rtn")
    qs = list(fs)
    for i in (0, 2, 4, 6, 8):
        qs[i] = 0.0  # five examples lost
    cur = paired_cell("fp", 15.0, 0.7, 0.0, 0.0, fs, method="fp") + paired_cell(
        "rtn-w4", 16.1, 0.8, math.log(16.1 / 15), 0.004, qs, method="rtn")
    tol = {"perplexity": {"rel": 0.001}, "accuracy": {"abs": 0.01}}
    c = compare_records(base, cur, tol)
    rows = _rows(c)
    ppl, acc = rows[("rtn-w4", "perplexity")], rows[("rtn-w4", "accuracy")]
    # perplexity: 16.0 -> 16.1 is beyond the 0.1% tolerance (a regression, exit 1) yet within the paired noise
    assert ppl.result == REGRESSION and c.failed
    assert ppl.noise_kind == "paired-bound" and ppl.noise_stderr == pytest.approx((0.004 + 0.004) * 16.1)
    assert ppl.within_noise and "within noise" in ppl.note
    # accuracy: 5 of 100 examples lost: paired stderr of the mean difference, from the samples
    d = np.array(qs) - np.array(fs)
    assert acc.noise_kind == "paired" and acc.noise_stderr == pytest.approx(d.std(ddof=1) / 10)
    assert acc.result == REGRESSION and acc.within_noise is False  # 0.05 > 2 x 0.0219
    md = to_markdown(c)
    assert "±0.129 paired-bound: within 2σ" in md and "paired: beyond 2σ" in md
    js = c.to_json()
    assert {r["metric"]: r["within_noise"] for r in js["rows"] if r["cell"] == "rtn-w4"}["perplexity"] is True
    # without samples or ratios: independent errors; without stderrs: nothing claimed
    a, b = rec("x", "perplexity", 10.0, stderr=0.3), rec("x", "perplexity", 10.5, stderr=0.4)
    assert noise_of(a, b) == (pytest.approx(0.5), "independent")
    assert noise_of(rec("x", "perplexity", 10.0), b) == (None, "")
