"""Perplexity protocols on hand-computable cases; KL/top-1 against a direct computation."""

import io
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.harness.measure.evaluate import Reference, build_eval_data, evaluate, make_windows
from quantbench.methods.base import ConfigError


class Uniform(nn.Module):
    """Logits all equal: every token has probability 1/V, so ppl == V under any protocol."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(ids.shape[0], ids.shape[1], self.vocab)


class Bigram(nn.Module):
    """Predicts the next token from a fixed table of logits indexed by the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids]


def test_uniform_model_has_ppl_equal_to_vocab():
    ids = torch.randint(0, 50, (1000,))
    for proto, stride in (("gptq", None), ("sliding", 37)):
        data = build_eval_data(ids, "t", proto, 64, stride)
        s = evaluate(Uniform(50), data)
        assert s.perplexity == pytest.approx(50.0, rel=1e-6)  # float32 log-softmax


def test_gptq_windows_drop_tail_and_count_tokens():
    ids = torch.arange(1000)
    w = make_windows(ids, "gptq", 128)
    assert len(w) == 7  # 1000 // 128, tail of 104 dropped
    assert all(x.input_ids.numel() == 128 and x.score_from == 1 for x in w)
    assert torch.equal(w[3].input_ids, torch.arange(384, 512))
    data = build_eval_data(ids, "t", "gptq", 128, max_windows=3)
    assert data.protocol["windows"] == 3 and data.protocol["tokens"] == 3 * 127


def test_sliding_windows_score_every_token_exactly_once():
    n = 1000
    ids = torch.arange(n)
    for seq_len, stride in ((128, 64), (100, 1), (64, 50)):
        scored = []
        for w in make_windows(ids, "sliding", seq_len, stride):
            scored += w.input_ids[w.score_from:].tolist()
        assert scored == list(range(1, n)), (seq_len, stride)
    # stride == seq_len: a window's first token has no context, so it is not scored (as in HF's recipe)
    scored = []
    for w in make_windows(ids, "sliding", 128, 128):
        scored += w.input_ids[w.score_from:].tolist()
    assert scored == [t for t in range(1, n) if t % 128]


def test_bigram_ppl_matches_hand_computation():
    # tokens alternate 0,1,0,1...; the model gives p(next is right) = 0.9 on the 2-token vocab
    p = 0.9
    table = torch.log(torch.tensor([[1 - p, p], [p, 1 - p]]))
    ids = torch.tensor([0, 1] * 100)
    data = build_eval_data(ids, "t", "gptq", 20)
    s = evaluate(Bigram(table), data)
    assert s.n_tokens == 10 * 19
    assert s.perplexity == pytest.approx(1 / p, rel=1e-6)


def test_kl_and_top1_against_direct_formula(tmp_path):
    torch.manual_seed(0)
    V = 11
    ids = torch.randint(0, V, (300,))
    ref_model, q_model = Bigram(torch.randn(V, V)), Bigram(torch.randn(V, V))
    data = build_eval_data(ids, "t", "sliding", 64, 32)
    ref, ref_stats = Reference.build(ref_model, data, tmp_path / "ref.npy")
    assert evaluate(ref_model, data, ref).kl == pytest.approx(0.0, abs=1e-7)
    s = evaluate(q_model, data, ref)
    lp, lq = F.log_softmax(ref_model.table, -1), F.log_softmax(q_model.table, -1)
    ctx = ids[:-1]  # every position but the last predicts a scored token exactly once
    kl = (lp.exp() * (lp - lq)).sum(-1)[ctx].double().mean()
    top1 = (lp.argmax(-1) == lq.argmax(-1))[ctx].double().mean()
    assert s.kl == pytest.approx(float(kl), rel=1e-5)
    assert s.top1 == pytest.approx(float(top1))
    assert ref_stats.perplexity == pytest.approx(evaluate(ref_model, data).perplexity)
    assert math.isfinite(s.perplexity_stderr())


def test_bad_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="valid: gptq, sliding"):
        make_windows(torch.arange(100), "rolling", 10)
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        make_windows(torch.arange(10), "gptq", 100)


# --------------------------------------------------------------------------- statistics against the reference


def _llama_percentile(values, q):
    """llama.cpp's ``percentile``: linear interpolation between the sorted values at fraction q / 100."""
    v = sorted(values)
    p = q / 100 * (len(v) - 1)
    i = int(p)
    p -= i
    return (1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)]


class PosBigram(nn.Module):
    """Logits = table[current token] + pos[position]: every scored position has its own distribution."""

    def __init__(self, table, pos):
        super().__init__()
        self.table, self.pos = table, pos

    def forward(self, ids):
        return self.table[ids] + self.pos[: ids.shape[1]]


@pytest.fixture
def pair(tmp_path):
    """A reference and a 'quantized' tiny random model (vocab 13) and their direct float64 statistics."""
    torch.manual_seed(1)
    V, L = 13, 50
    ids = torch.randint(0, V, (400,))
    t_ref, p_ref = torch.randn(V, V) * 2, torch.randn(L, V)
    t_q, p_q = t_ref + 0.5 * torch.randn(V, V), p_ref + 0.3 * torch.randn(L, V)
    ref_model, q_model = PosBigram(t_ref, p_ref), PosBigram(t_q, p_q)
    data = build_eval_data(ids, "t", "gptq", L)
    ref, _ = Reference.build(ref_model, data, tmp_path / "ref")
    # direct: full softmax in float64 at every scored position
    lp = torch.cat([F.log_softmax(ref_model(w.input_ids[None])[0, w.score_from - 1 : -1].double(), -1)
                    for w in data.windows])
    lq = torch.cat([F.log_softmax(q_model(w.input_ids[None])[0, w.score_from - 1 : -1].double(), -1)
                    for w in data.windows])
    tgt = torch.cat([w.input_ids[w.score_from :] for w in data.windows])
    kl = (lp.exp() * (lp - lq)).sum(-1)
    nll_q, nll_r = -lq.gather(1, tgt[:, None])[:, 0], -lp.gather(1, tgt[:, None])[:, 0]
    direct = {"kl": kl.numpy(), "dp": (torch.exp(-nll_q) - torch.exp(-nll_r)).numpy(),
              "dnll": (nll_q - nll_r).numpy(), "nll": nll_q.numpy(),
              "top1": float((lp.argmax(-1) == lq.argmax(-1)).double().mean())}
    return q_model, data, ref, direct


def _ctx(model, data, ref):
    from quantbench.harness.measure import CellContext

    return CellContext("c", model, None, data, ref, [], 0.0, 0)


def test_kl_statistics_match_direct_float64(pair):
    import numpy as np

    from quantbench.harness.measure import METRICS

    q_model, data, ref, d = pair
    ctx = _ctx(q_model, data, ref)
    val = {name: METRICS[name].compute(ctx)[0] for name in
           ("kl_divergence", "kl_median", "kl_p90", "kl_p99", "kl_p999", "kl_max")}
    assert all(r.status == "ok" for r in val.values())
    kl = d["kl"]
    assert val["kl_divergence"].value == pytest.approx(kl.mean(), rel=1e-4)
    assert val["kl_divergence"].stderr == pytest.approx(kl.std(ddof=1) / math.sqrt(kl.size), rel=1e-3)
    for name, q in (("kl_median", 50), ("kl_p90", 90), ("kl_p99", 99), ("kl_p999", 99.9)):
        assert val[name].value == pytest.approx(_llama_percentile(kl, q), rel=1e-3), name
    assert val["kl_max"].value == pytest.approx(kl.max(), rel=1e-3)
    # distinct order statistics here (the test would notice a wrong q)
    v = {k: r.value for k, r in val.items()}
    assert v["kl_median"] < v["kl_p90"] < v["kl_p99"] < v["kl_p999"] <= v["kl_max"]
    assert np.isclose(val["kl_median"].value, np.median(kl), rtol=1e-3)


def test_delta_p_same_top_and_ln_ppl_ratio_match_direct_float64(pair):
    from quantbench.harness.measure import METRICS

    q_model, data, ref, d = pair
    ctx = _ctx(q_model, data, ref)
    dp, dnll = d["dp"], d["dnll"]
    (rms,) = METRICS["rms_delta_p"].compute(ctx)
    assert rms.value == pytest.approx(math.sqrt((dp**2).mean()), rel=1e-5)
    (p01,) = METRICS["delta_p_p01"].compute(ctx)
    (p99,) = METRICS["delta_p_p99"].compute(ctx)
    assert p01.value == pytest.approx(_llama_percentile(dp, 1), rel=1e-4, abs=1e-7)
    assert p99.value == pytest.approx(_llama_percentile(dp, 99), rel=1e-4, abs=1e-7)
    assert p01.value < 0 < p99.value
    (top,) = METRICS["top1_agreement"].compute(ctx)
    (same,) = METRICS["same_top_p"].compute(ctx)
    assert top.value == pytest.approx(d["top1"]) and same.value == top.value
    assert same.protocol["alias_of"] == "top1_agreement"
    (lr,) = METRICS["ln_ppl_ratio"].compute(ctx)
    assert lr.value == pytest.approx(dnll.mean(), rel=1e-5)
    # paired: the spread of the differences, much smaller than the unpaired sqrt(var_q + var_ref) / sqrt(n)
    assert lr.stderr == pytest.approx(dnll.std(ddof=1) / math.sqrt(dnll.size), rel=1e-4)
    assert lr.protocol["paired"] == "over the same tokens"
    (ppl,) = METRICS["perplexity"].compute(ctx)
    nll = d["nll"]
    assert ppl.value == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert ppl.stderr == pytest.approx(ppl.value * nll.std(ddof=1) / math.sqrt(nll.size), rel=1e-4)


def test_statistics_unavailable_without_reference(pair):
    from quantbench.harness.measure import METRICS

    q_model, data, _, _ = pair
    ctx = _ctx(q_model, data, None)
    for name in ("kl_divergence", "kl_median", "kl_p90", "kl_p99", "kl_p999", "kl_max", "rms_delta_p",
                 "delta_p_p01", "delta_p_p99", "same_top_p", "ln_ppl_ratio", "top1_agreement"):
        (r,) = METRICS[name].compute(ctx)
        assert r.status == "unavailable" and r.value is None and "reference" in r.error, name
        assert METRICS[name].needs_reference
    assert METRICS["perplexity"].compute(ctx)[0].status == "ok"


def test_compact_store_within_its_error_bound(tmp_path):
    torch.manual_seed(2)
    V = 1000
    table = torch.randn(V, V) * 6  # log-prob ranges of ~50 nats, like a real LM's
    model = Bigram(table)
    data = build_eval_data(torch.randint(0, V, (600,)), "t", "gptq", 100)
    ref, stats = Reference.build(model, data, tmp_path / "ref")
    step_seen = []
    for i, w in enumerate(data.windows):
        exact = F.log_softmax(table[w.input_ids[w.score_from - 1 : -1]].float(), -1)
        err = (ref.raw_window(i) - exact).abs().max(-1).values.double()
        bound = ref.error_bound(i)
        assert (err <= bound).all(), float((err - bound).max())
        step = (exact.max(-1).values - exact.min(-1).values).double() / 65535
        step_seen.append(float((err / step).max()))
        # renormalized, a log-prob moves by at most another bound
        assert ((ref.window(i) - exact).abs().max(-1).values.double() <= 2 * bound).all()
        assert torch.equal(ref.argmax(i), exact.argmax(-1))
        assert torch.equal(ref.target_logprob(i), exact.gather(1, w.input_ids[w.score_from:, None]).squeeze(1))
    # rounding to nearest: errors reach step/2 (plus float32 rounding, a few % of a step), not a whole step
    assert 0.45 < max(step_seen) < 0.55
    assert ref.nbytes() < data.n_scored * V * 2 + data.n_scored * 32 + 4096  # 2 bytes per log-prob
    assert Reference.open(tmp_path / "ref", data).vocab == V
    assert stats.n_tokens == data.n_scored


def test_reference_key_and_cache(tmp_path):
    from quantbench.harness.measure import evaluate as ev

    torch.manual_seed(3)
    model = Bigram(torch.randn(7, 7))
    data = build_eval_data(torch.randint(0, 7, (200,)), "t", "gptq", 40)
    info = {"sha256": "abc", "params": 1}
    ref = Reference.load_or_build(model, info, data, tmp_path)
    assert ref.path.name == Reference.key(info, data) and (ref.path / "meta.json").exists()
    mtime = (ref.path / "logprobs.npy").stat().st_mtime_ns
    again = Reference.load_or_build(model, info, data, tmp_path)
    assert (again.path / "logprobs.npy").stat().st_mtime_ns == mtime  # reused, not rebuilt
    old_format = ev.REFERENCE_FORMAT
    try:
        ev.REFERENCE_FORMAT = "float32-v0"
        assert Reference.key(info, data) != ref.path.name  # the format is part of the key
        assert Reference.open(ref.path, data) is None  # a store of another format is never read
    finally:
        ev.REFERENCE_FORMAT = old_format
    (ref.path / "meta.json").unlink()  # a partial store is rebuilt
    assert Reference.open(ref.path, data) is None
    assert Reference.load_or_build(model, info, data, tmp_path).vocab == 7


def test_suite_with_only_kl_or_a_kl_statistic_builds_the_reference(tmp_path, capsys):
    from quantbench.harness.run.records import read_records
    from quantbench.harness.run.runner import run_suite
    from quantbench.harness.run.suite import parse_suite

    for metrics in (["kl_divergence"], ["kl_p99", "ln_ppl_ratio"]):
        suite = parse_suite({"name": "t", "models": ["tiny-llama"], "seed": 0,
                             "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 32, "max_windows": 2},
                             "metrics": metrics,
                             "cells": [{"name": "fp", "method": "fp"},
                                       {"name": "r3", "method": "rtn", "params": {"bits": 3, "group_size": 64}}]})
        recs = read_records(run_suite(suite, tmp_path / "-".join(metrics)) / "records.jsonl")
        by = {(r["cell"], r["metric"]): r for r in recs}
        assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
        for m in metrics:
            assert by[("fp", m)]["value"] == pytest.approx(0.0, abs=1e-5)
            assert by[("r3", m)]["value"] > 1e-4
    # stderr is no TTY here: neither the run's bar nor a method's per-layer bar printed anything
    err = capsys.readouterr().err
    assert "\r" not in err and "cell/s" not in err and "rtn" not in err


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_over_cells_on_a_tty(tmp_path, monkeypatch):
    from quantbench.harness.run.runner import run_suite
    from quantbench.harness.run.suite import parse_suite
    from quantbench.methods.quantize import layer_progress

    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(layer_progress(range(3), desc="layers-x")) == [0, 1, 2]
    assert "layers-x" in tty.getvalue()
    suite = parse_suite({"name": "bar", "models": ["tiny-llama"], "seed": 0,
                         "eval": {"dataset": "wiki", "protocol": "gptq", "seq_len": 32, "max_windows": 1},
                         "metrics": ["perplexity"], "cells": ["fp", {"name": "r8", "method": "rtn"}]})
    run_suite(suite, tmp_path / "run")
    out = tty.getvalue()
    assert "bar: 100%" in out and "2/2" in out and "tiny-llama/r8" in out
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no TTY: silent
    assert list(layer_progress(range(3), desc="layers-y")) == [0, 1, 2] and sys.stderr.getvalue() == ""


# --------------------------------------------------------------------------- batched windows, the fast pass


def _tiny_pair():
    from quantbench.harness.inputs.models import tiny_llama

    return tiny_llama().model.eval(), tiny_llama(seed=1).model.eval()


def _direct(model, data, ref):
    """The pass as written before the fast path: one window per forward, F.log_softmax, isfinite, the store
    decoded by Reference.decode and renormalized, F.kl_div; float32 everywhere as there."""
    nll, kl, top1 = [], [], 0
    for i, w in enumerate(data.windows):
        with torch.inference_mode():
            lp = F.log_softmax(model(w.input_ids[None]).logits[0, w.score_from - 1 : -1].float(), dim=-1)
        assert torch.isfinite(lp).all()
        nll.append(-lp.gather(1, w.input_ids[w.score_from :, None])[:, 0].double())
        a, b = ref.offsets[i], ref.offsets[i + 1]
        rl = F.log_softmax(Reference.decode(np.array(ref._array("logprobs.npy")[a:b]),
                                            np.array(ref._array("scale.npy")[a:b])), dim=-1)
        kl.append(F.kl_div(lp, rl, log_target=True, reduction="none").sum(-1).double())
        top1 += int((ref.argmax(i) == lp.argmax(-1)).sum())
    return torch.cat(nll), torch.cat(kl), top1


@pytest.mark.parametrize("proto, stride", [("gptq", None), ("sliding", 40)])
def test_fast_pass_is_bitwise_the_direct_formulas(proto, stride, tmp_path):
    """Reused buffers, in-place decode and KL, the one-read finiteness check: the same float32 bits."""
    ref_model, q_model = _tiny_pair()
    ids = torch.randint(0, 256, (700,))
    data = build_eval_data(ids, "t", proto, 96, stride, None)
    ref, _ = Reference.build(ref_model, data, tmp_path / "ref")
    s = evaluate(q_model, data, ref)
    nll, kl, top1 = _direct(q_model, data, ref)
    assert torch.equal(torch.from_numpy(s.token_nll()), nll)
    assert torch.equal(torch.from_numpy(s.token_kl()), kl)
    assert s.top1_sum == top1 and s.n_tokens == nll.numel() and 0 < top1 < nll.numel()
    assert s.kl_sum == float(kl.sum()) or math.isclose(s.kl_sum, float(kl.sum()), rel_tol=1e-12)
    for i in range(len(data.windows)):  # the store's decode into a buffer is Reference.decode's, bit for bit
        a, b = ref.offsets[i], ref.offsets[i + 1]
        assert torch.equal(ref.raw_window(i), Reference.decode(np.array(ref._array("logprobs.npy")[a:b]),
                                                                np.array(ref._array("scale.npy")[a:b])))


class Counting(nn.Module):
    """Wraps a model; records the input shape of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, ids):
        self.shapes.append(tuple(ids.shape))
        return self.inner(ids)


@pytest.mark.parametrize("proto, stride", [("gptq", None), ("sliding", 70)])
@pytest.mark.parametrize("bs", [2, 3, 8])
def test_batched_windows_match_batch_1(proto, stride, bs, tmp_path):
    """--batch-size N: the same windows scored the same way, N per forward (a shorter last sliding window
    alone); every statistic within 1e-6 relative of batch 1 (GEMM blocking is the only difference)."""
    ref_model, q_model = _tiny_pair()
    ids = torch.randint(0, 256, (900,))
    data = build_eval_data(ids, "t", proto, 128, stride, None)
    ref, _ = Reference.build(ref_model, data, tmp_path / "ref")
    one = evaluate(q_model, data, ref)
    counted = Counting(q_model)
    many = evaluate(counted, data, ref, batch_size=bs)
    lens = [w.input_ids.numel() for w in data.windows]
    assert sum(s[0] for s in counted.shapes) == len(data.windows) and max(s[0] for s in counted.shapes) <= bs
    assert len(counted.shapes) < len(data.windows)  # batched
    assert [s[1] for s in counted.shapes for _ in range(s[0])] == lens  # in order, equal lengths per batch
    if proto == "sliding":
        assert lens[-1] < lens[0] and counted.shapes[-1] == (1, lens[-1])
    assert many.n_tokens == one.n_tokens and many.top1_sum == one.top1_sum
    for f in ("perplexity", "kl", "top1"):
        assert math.isclose(getattr(many, f), getattr(one, f), rel_tol=1e-6), f
    assert max(abs(a - b) for a, b in zip(many.token_kl(), one.token_kl(), strict=True)) <= 1e-6 * one.kl
    # the batch size is data's default too, and the reference built batched is the same store within rounding
    data.batch_size = bs
    assert math.isclose(evaluate(q_model, data, ref).perplexity, one.perplexity, rel_tol=1e-6)
    ref_b, _ = Reference.build(ref_model, data, tmp_path / "ref_b")
    assert math.isclose(evaluate(q_model, data, ref_b).kl, one.kl, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_batch_size_is_a_positive_int(bad):
    ids = torch.randint(0, 50, (300,))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        build_eval_data(ids, "t", "gptq", 100, batch_size=bad)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        evaluate(Uniform(50), build_eval_data(ids, "t", "gptq", 100), batch_size=bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("bs", [1, 2])
def test_a_non_finite_logit_fails_the_pass(value, bs):
    """One NaN or infinite logit anywhere in a scored row is caught by the one-read check (its window named)."""
    V = 30
    table = torch.randn(V, V)
    ids = torch.randint(0, V, (300,))
    data = build_eval_data(ids, "t", "gptq", 100)

    class Bad(nn.Module):
        def forward(self, x):
            out = table[x].clone()
            for r in range(x.shape[0]):  # window 1: the second row of the first batch of 2
                if torch.equal(x[r], data.windows[1].input_ids):
                    out[r, 57, 3] = value
            return out

    with pytest.raises(FloatingPointError, match="non-finite logits in window 1"):
        evaluate(Bad(), data, batch_size=bs)


def test_run_batch_size_in_provenance_and_resume_under_another(tmp_path):
    """`run --batch-size`: the records of the eval pass carry provenance.batch_size (the others do not), the
    values are batch 1's, and --resume under another batch size reruns nothing (it is no part of a cell's
    definition); qb.evaluate(batch_size=) records it too."""
    import yaml

    from quantbench.harness import api as qb
    from quantbench.harness.cli import main
    from quantbench.harness.run.records import read_records

    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "t", "models": ["tiny-llama"], "seed": 0,
        "eval": [{"dataset": "wiki", "protocol": "gptq", "seq_len": 32, "max_windows": 3},
                 {"dataset": "kjv", "protocol": "gptq", "seq_len": 32, "max_windows": 3}],
        "metrics": ["perplexity", "kl_divergence", "bits_per_weight"],
        "cells": [{"name": "r3", "method": "rtn", "params": {"bits": 3, "group_size": 64}}]}))
    runs = {}
    for bs in (1, 2):
        out = tmp_path / f"bs{bs}"
        assert main(["run", str(suite), "--out", str(out), *(["--batch-size", str(bs)] if bs > 1 else [])]) == 0
        runs[bs] = read_records(out / "records.jsonl")
    by = {bs: {(r["metric"], r["protocol"].get("eval_index")): r for r in recs} for bs, recs in runs.items()}
    assert set(by[1]) == {("perplexity", None), ("perplexity", 1), ("kl_divergence", None), ("bits_per_weight", None)}
    for key in by[1]:
        one, two = by[1][key], by[2][key]
        assert one["value"] == pytest.approx(two["value"], rel=1e-6, abs=1e-9)
        assert one["provenance"]["cell_definition"] == two["provenance"]["cell_definition"]
        if key[0] == "bits_per_weight":
            assert "batch_size" not in two["provenance"]
        else:
            assert (one["provenance"]["batch_size"], two["provenance"]["batch_size"]) == (1, 2)
    assert main(["run", str(suite), "--out", str(tmp_path / "bs2"), "--resume", "--batch-size", "3"]) == 0
    assert read_records(tmp_path / "bs2" / "records.jsonl") == runs[2]  # nothing rerun, nothing refused
    model, tok = qb.load_model("tiny-llama")
    (three,) = qb.evaluate(model, tok, seq_len=32, max_windows=3, batch_size=3)
    (one,) = qb.evaluate(model, tok, seq_len=32, max_windows=3)
    assert (three["provenance"]["batch_size"], one["provenance"]["batch_size"]) == (3, 1)
    assert three["value"] == pytest.approx(one["value"], rel=1e-6)
