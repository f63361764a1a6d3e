"""Issue U, the CLI's error contract: a user error exits 2 with ONE `error: ...` line on stderr (no traceback)
naming the file and line; a regression exits 1 (compare only); `compare` fails closed on a baseline or run
that cannot be read whole; a baseline never lands outside results/baselines/."""

import json
import logging
import subprocess
import sys

import pytest

from quantbench.harness.cli import main
from quantbench.harness.report import compare as cmp_mod

from .fake_records import cell

RECS = (cell("fp", {"perplexity": 20.0, "bits_per_weight": 16.0}, method="fp")
        + cell("rtn-w4", {"perplexity": 22.0, "bits_per_weight": 4.5}, method="rtn"))


def _lines(recs) -> list[str]:
    return [json.dumps(r) for r in recs]


def _write(path, lines, *, newline_at_end=True) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")
    return str(path)


def _run_dir(tmp_path, name="run", lines=None, env=None):
    d = tmp_path / name
    _write(d / "records.jsonl", _lines(RECS) if lines is None else lines)
    if env is not None:
        (d / "env.json").write_text(env)
    return d


def _one_error_line(capsys) -> str:
    """The one stderr line of a user error; nothing (no PASS, no half a diff) on stdout."""
    out, err = capsys.readouterr()
    assert out == "", out
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err.strip()


# --------------------------------------------------------------------------- run --threads
@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_run_threads_must_be_a_positive_int(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--threads", value])
    assert e.value.code == 2
    err = _one_error_line(capsys)
    assert "--threads" in err and "positive integer" in err and repr(value) in err


def test_argparse_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "only-one"])
    assert e.value.code == 2
    assert "the following arguments are required: current" in _one_error_line(capsys)


# --------------------------------------------------------------------------- report: bad records
BAD_LINES = {
    "json-list": ("[]", "expected a JSON object, got a list"),
    "lacks-keys": (json.dumps({"cell": "fp", "metric": "perplexity"}), "record lacks 'schema'"),
    "string-value": (json.dumps(dict(RECS[1], value="22.0")), "'value' must be a number or null, got a string"),
    "not-json": ("{oops", "not a JSON record"),
    "bad-status": (json.dumps(dict(RECS[1], status="great")), "'status' must be one of ok, failed, unavailable"),
    "model-string": (json.dumps(dict(RECS[1], model="tiny-llama")), "'model' must be an object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_report_on_bad_records_line_exits_2_naming_file_and_line(kind, tmp_path, capsys):
    bad, why = BAD_LINES[kind]
    lines = _lines(RECS)
    lines.insert(2, bad)  # line 3, with good lines after it
    d = _run_dir(tmp_path, lines=lines)
    assert main(["report", str(d)]) == 2
    err = _one_error_line(capsys)
    assert f"{d / 'records.jsonl'}:3: " in err and why in err
    assert not (d / "leaderboard.md").exists() and not (d / "leaderboard.html").exists()


def test_report_on_non_utf8_records_exits_2(tmp_path, capsys):
    d = _run_dir(tmp_path)
    p = d / "records.jsonl"
    p.write_bytes(p.read_bytes() + "{\"cell\": \"caf\u00e9\"}\n".encode("latin-1") + b"\n")
    assert main(["report", str(d)]) == 2
    err = _one_error_line(capsys)
    assert f"{p}:{len(RECS) + 1}: not UTF-8 text (byte 0xe9" in err


@pytest.mark.parametrize("env, why", [
    ("{not json", "env.json:1: not valid JSON"),
    ("[1, 2]", "env.json: expected a JSON object, got a list"),
    (json.dumps({"hardware": "AMD EPYC"}), "env.json: 'hardware' must be an object, got a string"),
    (b"\xff\xfe{}", "env.json: not UTF-8 text"),
])
def test_report_on_bad_env_json_exits_2(env, why, tmp_path, capsys):
    d = _run_dir(tmp_path)
    (d / "env.json").write_bytes(env if isinstance(env, bytes) else env.encode())
    assert main(["report", str(d)]) == 2
    err = _one_error_line(capsys)
    assert str(d) in err and why in err
    assert not (d / "leaderboard.md").exists()


def test_report_on_missing_directory_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(tmp_path / "no-such-run")]) == 2
    assert "no-such-run: no such run directory or records file" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run directory (no records.jsonl)" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no leaderboard in the current directory


def test_report_tolerates_a_torn_last_line_of_a_run_with_a_warning(tmp_path, capsys, caplog):
    lines = _lines(RECS)
    d = _run_dir(tmp_path, lines=lines[:-1] + [lines[-1][:25]])
    (d / "records.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:25]]))  # no newline: killed mid-write
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(d)]) == 0
    assert f"records.jsonl:{len(lines)}: skipped an incomplete last line" in caplog.text
    assert "| rtn-w4 |" in (d / "leaderboard.md").read_text()
    capsys.readouterr()


# --------------------------------------------------------------------------- compare: bad input is 2, not 1
@pytest.mark.parametrize("kind", ["json-list", "lacks-keys", "string-value", "not-json"])
def test_compare_on_bad_baseline_line_exits_2(kind, tmp_path, capsys):
    bad, why = BAD_LINES[kind]
    base = _write(tmp_path / "base.jsonl", _lines(RECS) + [bad])
    run = _run_dir(tmp_path)
    assert main(["compare", base, str(run)]) == 2
    err = _one_error_line(capsys)
    assert f"base.jsonl:{len(RECS) + 1}: " in err and why in err


def test_compare_on_bad_current_line_exits_2(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _lines(RECS))
    lines = _lines(RECS)
    lines[1] = json.dumps(dict(RECS[1], value="20.0"))
    run = _run_dir(tmp_path, lines=lines)
    assert main(["compare", base, str(run)]) == 2
    assert "records.jsonl:2: 'value' must be a number or null" in _one_error_line(capsys)


def test_compare_on_non_utf8_baseline_exits_2(tmp_path, capsys):
    base = tmp_path / "base.jsonl"
    base.write_bytes(("\n".join(_lines(RECS[:2])) + "\n").encode() + b"\x80\x81\n")
    assert main(["compare", str(base), str(_run_dir(tmp_path))]) == 2
    assert "base.jsonl:3: not UTF-8 text (byte 0x80 at column 1)" in _one_error_line(capsys)


@pytest.mark.parametrize("content, why", [
    ("", "no baseline records in the file"),
    ("\n\n  \n", "no baseline records in the file"),
    ("garbage\nmore garbage\n", ":1: not a JSON record"),
    (json.dumps(RECS[0])[:40], ":1: not a JSON record"),  # fully torn: one unterminated line
    ("\n".join(_lines(RECS)) + "\n" + json.dumps(RECS[0])[:40], f":{len(RECS) + 1}: not a JSON record"),
    ("\n".join(_lines(RECS[:2]) + ["x"] + _lines(RECS[2:])) + "\n", ":3: not a JSON record"),
])
def test_compare_fails_closed_on_an_unreadable_baseline(content, why, tmp_path, capsys):
    """The CI gate used to print PASS and exit 0 on these (the lenient reader skipped every bad line)."""
    base = tmp_path / "base.jsonl"
    base.write_text(content)
    assert main(["compare", str(base), str(_run_dir(tmp_path))]) == 2
    err = _one_error_line(capsys)
    assert str(base) in err and why in err


def test_compare_fails_closed_on_an_empty_or_unreadable_run(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _lines(RECS))
    empty = _run_dir(tmp_path, "empty", lines=[])
    assert main(["compare", base, str(empty)]) == 2
    assert "no records in the file" in _one_error_line(capsys)
    garbage = _run_dir(tmp_path, "garbage", lines=["not json", "nor this"])
    assert main(["compare", base, str(garbage)]) == 2
    assert "records.jsonl:1: not a JSON record" in _one_error_line(capsys)
    torn_only = tmp_path / "torn" / "records.jsonl"
    torn_only.parent.mkdir()
    torn_only.write_text(json.dumps(RECS[0])[:30])  # the only line is torn: nothing readable
    assert main(["compare", base, str(torn_only.parent)]) == 2
    assert "no records in the file" in _one_error_line(capsys)


def test_compare_run_with_torn_last_line_is_compared_with_a_warning(tmp_path, capsys, caplog):
    base = _write(tmp_path / "base.jsonl", _lines(RECS))
    lines = _lines(RECS)
    run = tmp_path / "run"
    _write(run / "records.jsonl", lines[:-1] + [lines[-1][:30]], newline_at_end=False)
    with caplog.at_level(logging.WARNING):
        rc = main(["compare", base, str(run)])
    out = capsys.readouterr().out
    assert rc == 1  # the torn record's metric is missing from the run: a failure, never a silent pass
    assert "skipped an incomplete last line" in caplog.text
    assert "**bits_per_weight**" in out.split("### Regressions")[1] and "not measured in the current run" in out
    # the same torn line in a baseline is an error: a baseline is read whole
    assert main(["compare", str(run / "records.jsonl"), base]) == 2
    assert "an incomplete last line" in _one_error_line(capsys)


def test_compare_json_to_unwritable_path_exits_2(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _lines(RECS))
    assert main(["compare", base, base, "--json", str(tmp_path / "no" / "dir" / "s.json")]) == 2
    assert "No such file or directory" in _one_error_line(capsys)


def test_compare_bad_tolerances_file_exits_2(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _lines(RECS))
    tol = tmp_path / "tol.yaml"
    for content, why in [(b"tolerances: [1, 2]\n", "tolerances: expected a mapping"),
                         (b"perplexity: {rel: 0.1}\n\xff\n", "not UTF-8 text"),
                         (b"tolerances:\n  perplexity: {rel: [\n", "invalid YAML")]:
        tol.write_bytes(content)
        assert main(["compare", base, base, "--tolerances", str(tol)]) == 2
        assert why in _one_error_line(capsys)


# --------------------------------------------------------------------------- baseline names
@pytest.mark.parametrize("name", ["../evil", "../../etc/evil", "a/b", ".hidden", "..", "x\ny", "/abs"])
def test_baseline_update_refuses_a_suite_name_that_leaves_the_baselines_folder(name, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(cmp_mod, "BASELINES_DIR", tmp_path / "results" / "baselines")
    run = _run_dir(tmp_path, lines=_lines([dict(r, suite=name) for r in RECS]))
    assert main(["baseline", "update", str(run)]) == 2  # the run's own suite name
    assert "cannot name a baseline file" in _one_error_line(capsys)
    assert main(["baseline", "update", str(_run_dir(tmp_path, "ok")), "--suite", name]) == 2  # or --suite
    assert "cannot name a baseline file" in _one_error_line(capsys)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl")) == [
        "ok/records.jsonl", "run/records.jsonl"]  # nothing written anywhere
    # --out FILE remains the way to write a baseline of such a suite where the user says
    assert main(["baseline", "update", str(run), "--out", str(tmp_path / "mine.jsonl")]) == 0
    capsys.readouterr()


def test_baseline_update_refuses_a_symlink_out_of_the_baselines_folder(tmp_path, monkeypatch, capsys):
    bdir = tmp_path / "baselines"
    bdir.mkdir()
    (bdir / "t.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    monkeypatch.setattr(cmp_mod, "BASELINES_DIR", bdir)
    assert main(["baseline", "update", str(_run_dir(tmp_path))]) == 2
    assert "resolves outside" in _one_error_line(capsys)
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_baseline_update_refuses_a_torn_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmp_mod, "BASELINES_DIR", tmp_path / "b")
    lines = _lines(RECS)
    run = tmp_path / "run"
    _write(run / "records.jsonl", lines[:-1] + [lines[-1][:30]], newline_at_end=False)
    assert main(["baseline", "update", str(run)]) == 2
    assert "an incomplete last line" in _one_error_line(capsys)
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- the real process
def test_subprocess_user_errors_have_one_line_and_no_traceback(tmp_path):
    d = _run_dir(tmp_path)
    (d / "records.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    r = subprocess.run([sys.executable, "-m", "quantbench.harness.cli", "report", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {d / 'records.jsonl'}:1: not UTF-8 text")


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", str(2**70)], ["--seed", "x"], ["--limit", "0"],
                                  ["--limit", "-3"]])
def test_run_seed_and_limit_are_checked(argv, capsys):
    from quantbench.harness.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "suites/smoke.yaml", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5"])
def test_run_batch_size_must_be_a_positive_int(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "smoke", "--batch-size", value])
    assert e.value.code == 2
    err = _one_error_line(capsys)
    assert "--batch-size" in err and "positive integer" in err and repr(value) in err
