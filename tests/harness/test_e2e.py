"""The CPU form of the end-to-end device check (``quantbench gpu-check --e2e --e2e-device cpu``)."""

from __future__ import annotations

import json

import torch

from quantbench.harness.tools import e2e
from quantbench.harness.tools.gpu_check import add_command

RANDOM = {"random": "llama", "hidden_size": 256, "layers": 2, "seed": 0}  # the suite's model, smaller


def _rec(cell: str, metric: str, value: float | None, status: str = "ok") -> dict:
    return {"model": {"name": "m"}, "cell": cell, "metric": metric, "value": value, "status": status, "error": None}


def test_compare_gates_fp_and_rtn_perplexity_and_statuses():
    dev = [_rec("fp", "perplexity", 10.0), _rec("rtn-w4", "perplexity", 12.0 * (1 + 2e-4)),
           _rec("gptq", "perplexity", 11.0 * 1.01), _rec("gptq", "quantize_seconds", 2.0),
           _rec("awq", "perplexity", None, "failed"), _rec("fp", "energy_j_per_token", None, "unavailable")]
    cpu = [_rec("fp", "perplexity", 10.0), _rec("rtn-w4", "perplexity", 12.0), _rec("gptq", "perplexity", 11.0),
           _rec("gptq", "quantize_seconds", 10.0), _rec("awq", "perplexity", 9.0),
           _rec("fp", "energy_j_per_token", None, "unavailable")]
    res = e2e.compare_runs(dev, cpu)
    rows = {r["cell"]: r for r in res["rows"]}
    assert rows["fp"]["ok"] and rows["fp"]["ppl_rel_diff"] == 0
    assert not rows["rtn-w4"]["ok"] and "perplexity differs" in rows["rtn-w4"]["problems"][0]  # 2e-4 > 1e-4
    assert rows["gptq"]["ok"] and rows["gptq"]["quantize_ratio_cpu_over_device"] == 5.0  # not gated: reported
    assert not rows["awq"]["ok"] and not res["ok"]


def test_cpu_form_runs_the_same_path_and_passes(tmp_path, capsys):
    import argparse

    p = argparse.ArgumentParser()
    add_command(p.add_subparsers())
    args = p.parse_args(["gpu-check", "--e2e", "--e2e-device", "cpu", "--out", str(tmp_path / "e2e"),
                         "--cells", "fp,rtn-w4g128,gptq-w4g128", "--limit", "1"])
    args.model = [RANDOM]  # the CLI takes model strings; the random-init spec is a mapping
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: two OpenMP threads only wait on each other under load
    try:
        assert args.fn(args) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "e2e" / "e2e.json").read_text())
    assert res["ok"] and {r["cell"] for r in res["rows"]} == {"fp", "rtn-w4g128", "gptq-w4g128"}
    for r in res["rows"]:  # both sides on the CPU: the same numbers bit for bit
        assert r["ppl_rel_diff"] == 0.0, r
    assert "e2e cpu vs cpu: PASS" in capsys.readouterr().out
    assert args.fn(args) == 2  # an --out that holds a result is refused


def test_model_flag_takes_a_random_spec_mapping():
    import argparse

    import pytest

    p = argparse.ArgumentParser()
    add_command(p.add_subparsers())
    args = p.parse_args(["gpu-check", "--e2e", "--model", "{random: llama, hidden_size: 256, layers: 2, seed: 0}",
                         "--model", "smollm2-135m"])
    assert args.model == [RANDOM, "smollm2-135m"]  # a flow mapping becomes the suite's mapping; a name stays
    with pytest.raises(SystemExit):  # an unparsable mapping is an argument error, not a model name
        p.parse_args(["gpu-check", "--e2e", "--model", "{random: [llama"])


def test_cpu_side_runs_the_fp32_reference_kernels(tmp_path, monkeypatch):
    """The CPU side's packed integer weights take the fp32 reference path (the fast path is bf16), the
    device side its own kernels; the switch is restored afterwards."""
    from quantbench.kernels import intmm

    seen = []

    def fake_run_suite(suite, out, *a, **k):
        seen.append((out.name, intmm.CPU_FAST_PATH))
        out.mkdir(parents=True)
        (out / "records.jsonl").write_text("")
        return out

    monkeypatch.setattr(e2e, "run_suite", fake_run_suite)
    monkeypatch.setattr(e2e, "with_models", lambda s, *a: s)
    before = intmm.CPU_FAST_PATH
    e2e.run_e2e(tmp_path, "cuda:0")
    assert seen == [("e2e-device-cuda0", before), ("e2e-cpu-cpu", False)]
    assert intmm.CPU_FAST_PATH == before
