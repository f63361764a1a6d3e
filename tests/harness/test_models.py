"""Model loading: HF directories and GGUF files, with their identity recorded."""

import pytest
import torch

from quantbench.harness.inputs.models import load_hf_dir, load_model, tiny_llama, tiny_opt, validate_model_spec
from quantbench.methods.base import ConfigError


def _save_hf_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lm = tiny_llama()
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")
    lm.model.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return lm


def test_hf_dir_round_trip(tmp_path):
    lm = _save_hf_dir(tmp_path)
    loaded = load_model({"name": "mine", "path": str(tmp_path)})
    x = torch.randint(0, 256, (1, 16))
    assert torch.equal(loaded.model(x).logits, lm.model(x).logits)
    info = loaded.info
    assert info["name"] == "mine" and info["params"] == lm.info["params"] and len(info["sha256"]) == 64
    assert info["source_precision"] == "float32" and info["architecture"] == "llama"
    assert loaded.tokenizer.encode("w5 w7", add_special_tokens=False) == [5, 7]


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_dir(tmp_path)
    with pytest.raises(ConfigError, match="valid: name, path"):
        validate_model_spec({"path": "x", "dtyp": "float32"})


def test_tiny_models_are_seeded_and_distinct():
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    opt = tiny_opt()
    assert opt.info["architecture"] == "opt" and any(m.bias is not None for m in opt.model.modules()
                                                       if isinstance(m, torch.nn.Linear))


@pytest.mark.slow
def test_default_model_identity(smollm2):
    info = smollm2.info
    assert info["name"] == "smollm2-135m" and info["source_precision"] == "GGUF Q4_1"
    assert info["params"] == 134_515_008 and info["architecture"] == "llama"
    assert info["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)


@pytest.mark.slow
def test_default_model_rtn_ordering(smollm2):
    """Real text, real model: KL and ppl grow as RTN loses bits (a small, fast version of the default suite)."""
    import copy

    from quantbench.harness.inputs import data
    from quantbench.harness.measure.evaluate import Reference, build_eval_data, evaluate
    from quantbench.methods.base import build_method

    ids = data.tokens("wiki", "test", smollm2.tokenizer)
    ev = build_eval_data(ids, "wiki", "gptq", 512, max_windows=2)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        ref, fp = Reference.build(smollm2.model, ev, Path(d) / "ref.npy")
        assert 5 < fp.perplexity < 40
        out = {}
        for bits, gs in ((8, -1), (4, 128), (3, 128)):
            m = build_method("rtn", {"bits": bits, "group_size": gs}).quantize(copy.deepcopy(smollm2.model), None)
            out[bits] = evaluate(m, ev, ref)
    assert 0 < out[8].kl < out[4].kl < out[3].kl
    assert out[4].perplexity < out[3].perplexity
    assert out[8].top1 > out[4].top1 > out[3].top1
