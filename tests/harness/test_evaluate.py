"""Perplexity protocols on hand-computable cases; KL/top-1 against a direct computation."""

import math

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
