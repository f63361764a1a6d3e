"""The GPU check's CPU dry run (TRITON_INTERPRET=1): every Triton kernel against its reference."""

import os
import subprocess
import sys

import pytest


@pytest.mark.triton
def test_gpu_check_dry_run_passes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "quantbench.harness.gpu_check", "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for kernel in ("w4a16-gptq", "w8a8-int8", "ternary-2bit", "kv-int4-decode-attn"):
        assert f"| {kernel} |" in r.stdout
    assert "0 failed" in r.stdout
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) >= 14
