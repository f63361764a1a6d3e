"""The GPU check's CPU dry run (TRITON_INTERPRET=1): every Triton kernel against its reference."""

import os
import subprocess
import sys

import pytest


@pytest.mark.triton
def test_gpu_check_dry_run_passes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "quantbench.harness.tools.gpu_check", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for kernel in ("w4a16-gptq", "w4a16-gptq-sorted", "w8a8-int8", "ternary-2bit", "kv-int4-decode-attn"):
        assert f"| {kernel} |" in r.stdout
    assert "0 failed" in r.stdout
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) >= 14


def test_gpu_check_saves_each_result_as_it_goes(tmp_path, monkeypatch):
    from quantbench.harness.tools import gpu_check

    seen = []

    def fake_check(case, M, K, N, device, dtype, timing, seed):
        # by the time a case runs, every earlier result is already in records.jsonl
        seen.append(len((tmp_path / "records.jsonl").read_text().splitlines()))
        return gpu_check.Result(case.name, M, K, N, rel_err=0.0, max_err=0.0, ok=True)

    monkeypatch.setattr(gpu_check, "check_case", fake_check)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = gpu_check.argparse.Namespace(dry_run=True, out=str(tmp_path), suites=None, only="int8", seed=0)
    assert gpu_check.cmd_gpu_check(args) == 0
    assert seen == list(range(len(seen))) and len(seen) == len(gpu_check.DRY_SHAPES) * len(gpu_check.DRY_M)
