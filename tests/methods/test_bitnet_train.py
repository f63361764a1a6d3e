"""bitnet-qat's distillation, 1-bit and from-scratch options, fp-train, the tokenizer-random model spec and the
cell-level ``models:`` key (the BitNet study, suites/bitnet.yaml)."""

import copy
import math

import pytest
import torch

from quantbench.harness.inputs.models import load_model, model_key, model_source, tiny_llama
from quantbench.harness.run.runner import definition_hashes
from quantbench.harness.run.suite import load_suite, parse_suite, with_models
from quantbench.methods import bitnet as B
from quantbench.methods.base import Calibration, ConfigError, build_method


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _calib(rows=8, seq=64):
    # a repeating byte pattern: learnable in a few steps
    base = torch.arange(seq) % 16 + 65
    return Calibration(tokens=base.repeat(rows, 1), dataset="pattern", seed=0)


def test_distill_loss_is_kl_teacher_student():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]])
    kl = 0.0
    for i in range(2):
        ps, pt = torch.softmax(s[0, i], -1), torch.softmax(t[0, i], -1)
        kl += sum(float(pt[v]) * (math.log(float(pt[v])) - math.log(float(ps[v]))) for v in range(3))
    assert B.distill_loss(s, t).item() == pytest.approx(kl / 2, rel=1e-6)
    assert B.distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_qat_distill_trains_toward_teacher(tmp_path):
    lm = tiny_llama()
    teacher = lm.model
    torch.manual_seed(0)
    meth = build_method("bitnet-qat", dict(steps=12, seq_len=32, batch_size=2, warmup=0, lr=2e-3, distill=True))
    model = meth.quantize(copy.deepcopy(teacher), _calib())
    curve = meth.artifacts["loss_curve"]
    assert meth.artifacts["loss"] == "kl_to_fp_logits"
    assert len(curve) == 12 and all(v >= 0 for _, v in curve)  # a KL is never negative
    assert sum(v for _, v in curve[-3:]) < sum(v for _, v in curve[:3])
    # the first logged loss is the KL of the untrained quantized student to the teacher on batch 0
    ids = B.qat_batch(_calib().tokens, 0, 2, 32)
    with torch.no_grad():
        kl_after = B.distill_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits).item()
    assert kl_after < curve[0][1]


def test_qat_1bit_packs_sign_codes():
    torch.manual_seed(0)
    meth = build_method("bitnet-qat", dict(steps=2, seq_len=32, batch_size=2, warmup=0, bits="1bit"))
    model = meth.quantize(tiny_llama().model, _calib())
    packed = [m for m in model.modules() if isinstance(m, B.TernaryLinear)]
    assert len(packed) == 14 and all(m.fmt == "1bit" for m in packed)
    assert all(set(m.codes().unique().tolist()) <= {-1, 1} for m in packed)
    with pytest.raises(ConfigError, match="granularity"):
        build_method("bitnet-qat", {"bits": "1bit", "granularity": "channel"})


def test_qat_from_scratch_gains_start_at_one_and_train_all():
    torch.manual_seed(0)
    lm = tiny_llama()
    emb0 = lm.model.get_input_embeddings().weight.detach().clone()
    seen = {}

    class Probe(B.BitNetQAT):
        def _train(self, model, modules, tokens, on_step=None, teacher=None):
            seen["gains"] = [m.norm_weight.detach().clone() for m in model.modules() if isinstance(m, B.BitLinear)]
            return super()._train(model, modules, tokens, on_step, teacher)

    meth = Probe(B.BitNetQATConfig(steps=3, seq_len=32, batch_size=2, warmup=0, norm_init="ones", train="all",
                                   lr=1e-2))
    model = meth.quantize(lm.model, _calib())
    assert all(torch.equal(g, torch.ones_like(g)) for g in seen["gains"])
    assert not torch.equal(model.get_input_embeddings().weight, emb0)  # embeddings trained too


def test_fp_train_lowers_loss_and_keeps_linears(tmp_path):
    torch.manual_seed(0)
    meth = build_method("fp-train", dict(steps=15, seq_len=32, batch_size=2, lr=3e-3, train="all"))
    meth.artifact_dir = tmp_path
    model = meth.quantize(tiny_llama().model, _calib())
    curve = meth.artifacts["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, 16)) and meth.artifacts["loss"] == "cross_entropy"
    assert sum(v for _, v in curve[-3:]) / 3 < sum(v for _, v in curve[:3]) / 3 - 0.5
    assert not any(isinstance(m, (B.BitLinear, B.TernaryLinear)) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    # the checkpoint (tied embedding and lm_head) resumes: a second run at the same config does no step
    again = build_method("fp-train", dict(steps=15, seq_len=32, batch_size=2, lr=3e-3, train="all"))
    again.artifact_dir = tmp_path
    again.quantize(tiny_llama().model, _calib())
    assert again.artifacts["loss_curve"] == curve


def test_random_spec_with_tokenizer():
    spec = {"random": "llama", "tokenizer": "tiny-llama", "layers": 1, "hidden_size": 64}
    lm = load_model(spec)
    assert lm.model.config.vocab_size == 256 and lm.info["tokenizer"] == "tiny-llama"
    assert model_key(spec).endswith("-ttiny-llama")
    with pytest.raises(ConfigError, match="tokenizer"):
        model_source({"random": "llama", "tokenizer": "gpt9"})
    with pytest.raises(ConfigError, match="unknown model field"):
        model_source({"name": "tiny-llama", "tokenizer": "tiny-llama"})


@pytest.mark.slow
def test_random_spec_with_smollm2_tokenizer():
    lm = load_model({"random": "llama", "tokenizer": "smollm2-135m", "layers": 1, "hidden_size": 64})
    cfg = lm.model.config
    assert cfg.vocab_size == len(lm.tokenizer) == 49152
    assert (cfg.eos_token_id, cfg.bos_token_id) == (lm.tokenizer.eos_token_id, lm.tokenizer.bos_token_id)
    assert max(lm.tokenizer.encode("Hello world, this is a test.")) < cfg.vocab_size


def _suite(models_key):
    cell = {"name": "only", "method": "fp", **({"models": models_key} if models_key is not None else {})}
    return {"name": "t", "models": ["tiny-llama", "tiny-opt"], "cells": [{"name": "all", "method": "fp"}, cell]}


def test_cell_models_key():
    s = parse_suite(_suite(["tiny-opt"]))
    assert [(model_key(m), c.name) for m, c in s.expand()] == [("tiny-llama", "all"), ("tiny-opt", "all"),
                                                               ("tiny-opt", "only")]
    assert set(definition_hashes(s)) == {("tiny-llama", "all"), ("tiny-opt", "all"), ("tiny-opt", "only")}
    assert len(parse_suite(_suite(None)).expand()) == 4
    assert len(with_models(s, ["tiny-llama"]).expand()) == 2  # --model: every cell on the given models
    for bad, msg in ((["tiny-gpt"], "unknown model 'tiny-gpt'"), ([], "non-empty list"), ("tiny-opt", "list"),
                     (["tiny-opt", "tiny-opt"], "twice")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_suite(_suite(bad))
        assert "\n" not in str(e.value)


def test_bitnet_suite_validates():
    s = load_suite("bitnet")
    names = {c.name for c in s.cells}
    assert {"fp", "gptq-w2g64", "bitnet-qat", "scratch-fp", "scratch-b1.58"} <= names
    on = {(model_key(m), c.name) for m, c in s.expand()}
    assert ("smollm2-135m", "scratch-fp") not in on and ("smollm2-135m", "gptq-w2g64") in on


def test_run_with_cell_models_and_loss_plot(tmp_path):
    """A two-model run: cells limited by ``models:`` run only there; the plot has one panel per model."""
    from quantbench.harness.report.publish import loss_curves, plot_qat_loss
    from quantbench.harness.run.records import read_records
    from quantbench.harness.run.runner import run_suite

    scratch = {"name": "scratch", "random": "llama", "tokenizer": "tiny-llama", "layers": 1, "hidden_size": 64}
    train = {"steps": 3, "seq_len": 32, "batch_size": 2, "train": "all"}
    doc = {"name": "bn", "models": ["tiny-llama", scratch], "seed": 0,
           "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 64, "max_windows": 2},
           "calibration": {"dataset": "wiki", "n_samples": 4, "seq_len": 64}, "metrics": ["perplexity"],
           "cells": [{"name": "qat", "method": "bitnet-qat", "models": ["tiny-llama"],
                      "params": {"steps": 3, "seq_len": 32, "batch_size": 2, "warmup": 1, "distill": True}},
                     {"name": "s-fp", "method": "fp-train", "models": ["scratch"], "params": train},
                     {"name": "s-b158", "method": "bitnet-qat", "models": ["scratch"],
                      "params": {**train, "warmup": 0, "norm_init": "ones"}}]}
    run_dir = run_suite(parse_suite(doc), tmp_path / "run")
    recs = read_records(run_dir / "records.jsonl")
    assert {(r["model"]["name"], r["cell"]) for r in recs} == {("tiny-llama", "qat"), ("scratch", "s-fp"),
                                                        ("scratch", "s-b158")}
    assert all(r["status"] == "ok" for r in recs)
    assert set(loss_curves([run_dir])) == {"tiny-llama/qat", "scratch/s-fp", "scratch/s-b158"}
    (tmp_path / "plots").mkdir()
    paths = plot_qat_loss([run_dir], tmp_path / "plots")
    assert paths and all(p.stat().st_size > 0 for p in paths)
