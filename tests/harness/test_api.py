"""The Python API (``import quantbench as qb``): the README's example runs, and each call keeps its contract."""

import copy
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import quantbench as qb
from quantbench.harness.paths import REPO_ROOT
from quantbench.methods.base import ConfigError
from quantbench.methods.qlinear import IntQuantLinear

RECORD_KEYS = {"schema", "run_id", "suite", "cell", "model", "method", "method_config", "metric", "value", "unit",
               "higher_is_better", "protocol", "stderr", "status", "error", "provenance"}


def _readme_python() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python block"
    return blocks[0]


def test_readme_example_runs(capsys):
    scope: dict = {}
    exec(compile(_readme_python(), "README.md:python-api", "exec"), scope)
    records, df, reloaded, gptq = scope["records"], scope["df"], scope["reloaded"], scope["gptq"]
    assert all(set(r) == RECORD_KEYS and r["status"] == "ok" for r in records)
    by = {r["metric"]: r for r in records}
    assert 0 < by["kl_divergence"]["value"] < 0.05 and by["perplexity"]["value"] > 1
    assert 4 < by["bits_per_weight"]["value"] < 5  # 4-bit codes + fp16 scales / zeros per 64
    assert by["perplexity"]["method"] == "gptq" and by["perplexity"]["method_config"]["bits"] == 4
    assert by["perplexity"]["provenance"]["device"] == "cpu" and by["perplexity"]["model"]["dtype"] == "float32"
    x = torch.randint(0, 256, (1, 32))
    with torch.inference_mode():
        assert torch.equal(reloaded(x).logits, gptq(x).logits)
    assert isinstance(df, pd.DataFrame) and set(df["cell"]) == {"rtn-w4g64"}
    assert len(df) == len(set(df["metric"])) and "model.name" in df and "provenance.seed" in df
    assert (df["status"] == "ok").all() and Path(df.attrs["run_dir"], "records.jsonl").exists()
    assert "perplexity" in capsys.readouterr().out


def test_evaluate_matches_the_runners_numbers(tmp_path):
    """qb.evaluate of fp with itself as reference: KL 0, agreement 1; its ppl equals the runner's fp cell."""
    model, tok = qb.load_model("tiny-llama")
    recs = {r["metric"]: r for r in qb.evaluate(model, tok, metrics=["perplexity", "kl_divergence", "top1_agreement"],
                                                seq_len=128, max_windows=1, reference=model)}
    assert recs["kl_divergence"]["value"] == pytest.approx(0, abs=1e-6) and recs["top1_agreement"]["value"] == 1.0
    df = qb.run("smoke", cells="fp", limit=1, models=["tiny-llama"], out=tmp_path / "run")
    ppl = df[(df["metric"] == "perplexity")]["value"].item()
    assert recs["perplexity"]["value"] == pytest.approx(ppl, rel=1e-6)
    unavailable = qb.evaluate(model, tok, metrics=["kl_divergence"], seq_len=128, max_windows=1)[0]
    assert unavailable["status"] == "unavailable" and unavailable["value"] is None


def test_quantize_checks_before_work():
    model, tok = qb.load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="gptq calibrate"):
        qb.quantize(model, "gptq", bits=4)
    with pytest.raises(ConfigError, match="unknown parameter 'bitz' for rtn"):
        qb.quantize(model, "rtn", bitz=4)
    with pytest.raises(ConfigError, match="give each method's parameters in the chain"):
        qb.quantize(model, ["rtn"], bits=4)
    gemma, _ = qb.load_model({"random": "gemma3", "hidden_size": 64})
    with pytest.raises(ConfigError, match=r"method 'llamacpp' does not support .*family gemma3"):
        qb.quantize(gemma, [("rtn", {"bits": 8}), ("llamacpp", {})])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, IntQuantLinear) for m in gemma.modules())  # the chain's first step did not run


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    model, tok = qb.load_model("tiny-llama")
    q = qb.quantize(copy.deepcopy(model), "w8a8", calibration=qb.calibration("wiki", tok, 2, 32))
    with pytest.raises(ConfigError, match="'w8a8' needs a save/load hook"):
        qb.save(q, tmp_path)
    saved = qb.save(qb.quantize(copy.deepcopy(model), "rtn", bits=3, group_size=64), tmp_path / "rtn")
    assert sorted(p.name for p in saved.iterdir()) == ["quantbench.json", "quantized.safetensors"]
    assert b"pickle" not in (saved / "quantized.safetensors").read_bytes()[:2048]


def test_methods_and_metrics_are_listed():
    ms = qb.methods()
    assert {"fp", "rtn", "gptq", "smoothquant", "kvquant", "llamacpp"} <= set(ms) and all(ms.values())
    assert callable(qb.methods) and qb.methods.__name__ == "quantbench.methods"  # the subpackage, callable
    assert qb.metrics()["perplexity"].startswith("ppl (ppl; lower is better)")
    with pytest.raises(AttributeError):
        qb.no_such_name  # noqa: B018
