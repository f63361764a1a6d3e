"""Ray executor on a local 2-CPU cluster: same values as the local executor, failures recorded."""

import pytest

ray = pytest.importorskip("ray")

from quantbench.harness.run.records import read_records  # noqa: E402
from quantbench.harness.run.runner import run_suite  # noqa: E402
from quantbench.harness.run.suite import ResourcesSpec, parse_suite  # noqa: E402

BASE = {
    "name": "ray-t",
    "models": ["tiny-llama"],
    "seed": 0,
    "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
    "calibration": {"dataset": "wiki", "n_samples": 2, "seq_len": 64},
    "metrics": ["perplexity", "kl_divergence", "bits_per_weight"],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import os

    marker = tmp_path_factory.mktemp("die") / "marker"
    os.environ["QUANTBENCH_PLUGINS"] = "tests.harness.plugin_methods"
    os.environ["QB_TEST_DIE_MARKER"] = str(marker)
    from quantbench.harness.run.runner import REPO_ROOT

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1",
                                       "QUANTBENCH_PLUGINS": "tests.harness.plugin_methods",
                                       "QB_TEST_DIE_MARKER": str(marker)}})
    yield
    ray.shutdown()
    os.environ.pop("QUANTBENCH_PLUGINS")


def _values(recs):
    return {(r["cell"], r["metric"]): r["value"] for r in recs}


def test_ray_matches_local_and_records_failures(cluster, tmp_path):
    from quantbench.harness.run.ray_executor import run_suite_ray

    cells = [
        {"name": "fp", "method": "fp"},
        {"name": "r4", "method": "rtn", "params": {"bits": 4, "group_size": 64}},
        {"name": "boom", "method": "test-boom"},
        {"name": "lost", "method": "test-die"},
        {"name": "retried", "method": "test-die-once", "resources": {"max_retries": 1}},
    ]
    suite = parse_suite({**BASE, "cells": cells})
    ray_recs = read_records(run_suite_ray(suite, tmp_path / "ray") / "records.jsonl")
    by = {(r["cell"], r["metric"]): r for r in ray_recs}
    boom = by[("boom", "perplexity")]
    assert boom["status"] == "failed" and "boom at quantize" in boom["error"]
    assert by[("lost", "perplexity")]["status"] == "failed"  # worker killed, no retries
    assert by[("retried", "perplexity")]["status"] == "ok"  # worker killed once, retried
    assert by[("retried", "perplexity")]["value"] == by[("fp", "perplexity")]["value"]
    local_suite = parse_suite({**BASE, "cells": cells[:2]})
    local = _values(read_records(run_suite(local_suite, tmp_path / "local") / "records.jsonl"))
    ray_vals = _values(ray_recs)
    for key, v in local.items():
        assert ray_vals[key] == v, key


def test_resume_across_executors(cluster, tmp_path):
    from quantbench.harness.run.ray_executor import run_suite_ray

    cells = [{"name": "fp", "method": "fp"}, {"name": "r3", "method": "rtn", "params": {"bits": 3, "group_size": 64}}]
    suite = parse_suite({**BASE, "cells": cells})
    run_suite(suite, tmp_path / "run", cell_filter=lambda c: c.name == "fp")
    run_suite_ray(suite, tmp_path / "run", resume=True)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert [r["cell"] for r in recs].count("fp") == 3 and [r["cell"] for r in recs].count("r3") == 3


def test_task_options_and_cluster_come_from_the_typed_suite(tmp_path, monkeypatch):
    from quantbench.harness.run import ray_executor

    suite = parse_suite({
        **BASE, "resources": {"num_cpus": 2, "memory": 1 << 30}, "executor": {"name": "ray", "num_cpus": 3},
        "cells": [{"name": "fp", "method": "fp"},
                  {"name": "g", "method": "fp", "resources": {"num_gpus": 0.5, "max_retries": 2}}],
    })
    fp, g = (ray_executor._task_options(suite.resources.merged(c.resources)) for c in suite.cells)
    assert fp == {"num_cpus": 2, "num_gpus": 0, "max_retries": 0, "retry_exceptions": False, "memory": 1 << 30}
    assert g == {"num_cpus": 2, "num_gpus": 0.5, "max_retries": 2, "retry_exceptions": False, "memory": 1 << 30}
    assert ray_executor._task_options(ResourcesSpec()) == {"num_cpus": 1, "num_gpus": 0, "max_retries": 0,
                                                           "retry_exceptions": False}

    class Stop(Exception):
        pass

    seen: dict = {}

    def init(**kw):
        seen.clear()
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Stop):
        ray_executor.run_suite_ray(suite, tmp_path / "a")
    assert seen["address"] is None and seen["num_cpus"] == 3  # the suite's executor: a local 3-CPU instance
    with pytest.raises(Stop):
        ray_executor.run_suite_ray(suite, tmp_path / "b", address="auto")  # the caller's (--address) wins
    assert seen["address"] == "auto" and seen["num_cpus"] is None
