"""The Python API (``import quantbench as qb``): the README's example runs, and each call keeps its contract."""

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantbench as qb
from quantbench.harness.paths import REPO_ROOT
from quantbench.methods.base import ConfigError, QuantizedModule, QuantizedTensorModule, model_storage
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
    gemma, _ = qb.load_model({"random": "opt", "hidden_size": 64})  # a family llamacpp refuses
    with pytest.raises(ConfigError, match=r"method 'llamacpp' does not support .*family opt"):
        qb.quantize(gemma, [("rtn", {"bits": 8}), ("llamacpp", {})])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, IntQuantLinear) for m in gemma.modules())  # the chain's first step did not run


#: every saveable method, with parameters that keep the tiny model's run short
SAVE_CASES = [
    ("rtn", {"bits": 3, "group_size": 64}),
    ("gptq", {"bits": 4, "group_size": 32, "act_order": True}),  # act-order: g_idx is saved
    ("awq", {"group_size": 64, "n_grid": 4, "max_tokens": 64, "clip_tokens": 32}),
    ("hqq", {"iters": 3}),
    ("w8a8", {"act_scheme": "per_tensor_static"}),
    ("smoothquant", {}),
    ("llamacpp", {"preset": "Q4_K_M"}),
    ("bitnet-ptq", {}),
    ("fp8", {}),
    ("fp8-weight", {}),
    ("mxfp4", {}),
    ("nvfp4-a4", {}),
]


@pytest.fixture(scope="module")
def tiny():
    model, tok = qb.load_model("tiny-llama")
    return model, qb.calibration("wiki", tok, 2, 32)


def _quantized(model, name, params, calib):
    return qb.quantize(copy.deepcopy(model), name, calibration=calib, **params)


@pytest.mark.parametrize("name,params", SAVE_CASES, ids=[c[0] for c in SAVE_CASES])
def test_save_load_is_bit_identical(tiny, tmp_path, name, params):
    """Reloaded: the same module classes and bytes, the logits torch.equal, each module's saved bytes its
    storage(); only norm weights (the folded smoothing/AWQ scales) are saved as changed fp tensors."""
    model, calib = tiny
    q = _quantized(model, name, params, calib)
    saved = qb.save(q, tmp_path / name)
    assert sorted(p.name for p in saved.iterdir()) == ["quantbench.json", "quantized.safetensors"]
    assert b"pickle" not in (saved / "quantized.safetensors").read_bytes()[:2048]
    meta = json.loads((saved / "quantbench.json").read_text())
    assert meta["version"] == 2 and meta["chain"][0]["method"] == name and meta["source"] == "tiny-llama"
    r, _ = qb.load(saved)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(r(x).logits, q(x).logits)
    qmods = {n: m for n, m in q.named_modules() if isinstance(m, (QuantizedModule, QuantizedTensorModule))}
    assert qmods and set(meta["modules"]) == set(qmods)
    rmods = dict(r.named_modules())
    with safe_open(str(saved / "quantized.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    for n, m in qmods.items():
        assert type(rmods[n]) is type(m)
        own = {k: v for k, v in stored.items() if k.startswith(n + ".")}
        assert sum(v.numel() * v.element_size() for v in own.values()) == m.storage().total, n
        for k, v in rmods[n].state_dict().items():
            assert torch.equal(v, m.state_dict()[k]), f"{n}.{k}"
    assert model_storage(r)["total"] == model_storage(q)["total"]
    changed = set(meta["changed"])
    assert changed == {k for k in stored if not any(k.startswith(n + ".") for n in qmods)}
    if name in ("smoothquant", "awq"):  # the smoothing / AWQ scales were folded into the norms
        assert changed and all(k.endswith("layernorm.weight") for k in changed)
        assert all(torch.equal(stored[k], q.state_dict()[k]) for k in changed)
    else:
        assert not changed


def test_save_refuses_what_it_cannot_rebuild(tiny, tmp_path):
    model, calib = tiny
    q = qb.quantize(copy.deepcopy(model), [("rtn", {"bits": 4, "group_size": 64}), ("kv-uniform", {"bits": 4})])
    with pytest.raises(ConfigError, match="qb.save does not support method 'kv-uniform'"):
        qb.save(q, tmp_path / "kv")
    assert not (tmp_path / "kv").exists()
    q = _quantized(model, "rtn", {"bits": 4, "group_size": 64}, calib)
    q.model.layers[0].mlp.act_fn = torch.nn.Linear(4, 4)  # a module the source model does not have
    with pytest.raises(ConfigError, match="act_fn.weight is not in the source model"):
        qb.save(q, tmp_path / "added")


def test_load_refuses_tampered_or_missing_files(tiny, tmp_path):
    model, calib = tiny
    d = qb.save(_quantized(model, "smoothquant", {}, calib), tmp_path / "sq")
    meta = json.loads((d / "quantbench.json").read_text())
    blob = (d / "quantized.safetensors").read_bytes()

    def case(new_meta, new_blob, match):
        t = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        t.mkdir()
        if new_meta is not None:
            (t / "quantbench.json").write_text(json.dumps(new_meta))
        if new_blob is not None:
            (t / "quantized.safetensors").write_bytes(new_blob)
        with pytest.raises(ConfigError, match=match):
            qb.load(t)

    flipped = bytearray(blob)
    flipped[-1] ^= 1
    case(meta, bytes(flipped), "sha256 differs")
    case(meta, None, "holds no quantized.safetensors")
    case(None, blob, "no readable quantbench.json")
    case({**meta, "format": "other"}, blob, "is not a quantbench-packed file")
    case({**meta, "version": 99}, blob, "format version 99")
    case({**meta, "source_fingerprint": "0" * 16}, blob, "not the one the checkpoint was saved from")
    name = next(iter(meta["modules"]))
    wrong = copy.deepcopy(meta)
    wrong["modules"][name]["spec"]["in_features"] *= 2
    case(wrong, blob, f"tensor {name}.qweight .* does not fit a W8A8Linear")
    unknown = copy.deepcopy(meta)
    unknown["modules"][name]["class"] = "NoSuchLinear"
    case(unknown, blob, "'NoSuchLinear', which this quantbench cannot rebuild")
    dropped = {**meta, "changed": meta["changed"][1:]}
    case(dropped, blob, "holds tensors the metadata does not name")


def test_load_reads_version_1_checkpoints(tiny, tmp_path):
    """A version-1 file (IntQuantLinear constructor args per module, every buffer stored, no hash) still loads."""
    model, calib = tiny
    q = _quantized(model, "rtn", {"bits": 4, "group_size": 64}, calib)
    d = tmp_path / "v1"
    d.mkdir()
    tensors, modules = {}, {}
    for n, m in q.named_modules():
        if isinstance(m, IntQuantLinear):
            modules[n] = m.save_spec()
            tensors.update({f"{n}.{k}": v.contiguous() for k, v in m.state_dict().items()})
    save_file(tensors, str(d / "quantized.safetensors"))
    (d / "quantbench.json").write_text(json.dumps({"format": "quantbench-packed", "version": 1, "source": "tiny-llama",
                                                   "dtype": "float32", "chain": q.quantbench["chain"],
                                                   "modules": modules}))
    r, _ = qb.load(d)
    x = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        assert torch.equal(r(x).logits, q(x).logits)


def test_methods_and_metrics_are_listed():
    ms = qb.methods()
    assert {"fp", "rtn", "gptq", "smoothquant", "kvquant", "llamacpp"} <= set(ms) and all(ms.values())
    assert callable(qb.methods) and qb.methods.__name__ == "quantbench.methods"  # the subpackage, callable
    assert qb.metrics()["perplexity"].startswith("ppl (ppl; lower is better)")
    with pytest.raises(AttributeError):
        qb.no_such_name  # noqa: B018
