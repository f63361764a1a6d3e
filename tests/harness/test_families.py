"""Model families through the harness: tiny random configs saved to disk, loaded by path, run by the smoke
methods. Each (family, method) either runs and stays close to the unquantized model (8-bit settings; a
method that runs but changes nothing, or gives nonsense, fails here) or is refused before any work with an
error naming the method and the family (``FAMILY_LIMITS``).

The table this pins (hidden 256, 2 layers, relative logit error ||q - fp|| / ||fp|| on 64 tokens):
llama, qwen2, mistral: every method ok; gemma3: llamacpp, w8a8, smoothquant, kv-uniform, kvquant refused;
opt: llamacpp refused; phi3: smoothquant, kv-uniform, kvquant refused.
"""

import copy

import pytest
import torch
from torch import nn

import quantbench as qb
from quantbench.harness.inputs.models import FAMILY_LIMITS, random_model
from quantbench.methods.base import ConfigError, QuantizedModule

FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "opt", "phi3")
#: 8-bit settings (kvquant: its widest, 4): close to the unquantized model unless the method is wrong
METHODS = {"fp": {}, "rtn": {"bits": 8, "group_size": -1}, "gptq": {"bits": 8, "group_size": -1}, "w8a8": {},
           "smoothquant": {"alpha": 0.5}, "kv-uniform": {"bits": 8}, "kvquant": {"bits": 4, "fisher": False},
           "llamacpp": {"preset": "Q8_0"}}
TOLERANCE = {"kvquant": 0.2}  # 4-bit keys and values (llama: 0.10); every other row is 8-bit: 0.05


def _byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 ids, one per byte (the random models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's random model saved as an HF directory (weights + config + tokenizer)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        random_model(family, hidden_size=256, layers=2).model.save_pretrained(d)
        _byte_tokenizer().save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="module")
def calib_and_input(saved):
    _, tok = qb.load_model({"path": str(saved["llama"])})
    calib = qb.calibration("wiki", tok, n_samples=4, seq_len=64)
    return calib, calib.tokens[:1]


@pytest.fixture(scope="module")
def loaded(saved):
    """Each family loaded once through the harness (qb.load_model by path); tests quantize copies."""
    return {family: qb.load_model({"path": str(d)}) for family, d in saved.items()}


def _logits(model, x):
    with torch.inference_mode():
        return model(x).logits.float()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_method(loaded, calib_and_input, family, method):
    calib, x = calib_and_input
    model, tok = loaded[family]
    assert qb.load_model.__module__ == "quantbench.harness.api" and tok.vocab_size == 256
    ref = _logits(model, x)
    q = copy.deepcopy(model)
    if method in FAMILY_LIMITS.get(family, {}):
        with pytest.raises(ConfigError, match=rf"method '{method}' does not support model .*\(family {family}\)"):
            qb.quantize(q, method, calibration=calib, **METHODS[method])
        assert torch.equal(_logits(q, x), ref)  # refused before any work: nothing changed
        return
    q = qb.quantize(q, method, calibration=calib, **METHODS[method])
    out = _logits(q, x)
    rel = float((out - ref).norm() / ref.norm())
    layer_linears = [n for n, m in q.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    kv_wrappers = [m for m in q.modules() if type(m).__name__ == "KVProj"]
    if method == "fp":
        assert torch.equal(out, ref)
        return
    if method in ("kv-uniform", "kvquant"):  # both projections of every layer wrapped
        assert len(kv_wrappers) == 2 * model.config.num_hidden_layers, (family, method)
    else:  # every linear of every layer replaced by a quantized module
        assert not layer_linears and any(isinstance(m, QuantizedModule) for m in q.modules()), layer_linears[:3]
    if method == "smoothquant":  # smoothing happened (a no-op would be naive W8A8 under SmoothQuant's name)
        assert q.quantbench["methods"][-1].artifacts["smoothed_groups"] == 2 * model.config.num_hidden_layers
    assert 0 < rel < TOLERANCE.get(method, 0.05), (family, method, rel)
