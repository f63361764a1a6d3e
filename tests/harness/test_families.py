"""Model families through the harness: tiny random configs saved to disk, loaded by path, run by the smoke
methods. Each (family, method) either runs and stays close to the unquantized model (8-bit settings; a
method that runs but changes nothing, or gives nonsense, fails here) or is refused before any work with an
error naming the method and the family (``FAMILY_LIMITS``).

The table this pins (hidden 256, 2 layers, relative logit error ||q - fp|| / ||fp|| on 64 tokens):
llama, qwen2, mistral, gemma3: every method ok; opt: llamacpp, awq refused; phi3: smoothquant, awq refused (its
KV methods quantize the K/V slices of the fused qkv_proj).  Gemma 3's replaced modules keep its semantics
(tests at the end: scaled embedding, (1 + w) RMSNorm folds, keys quantized after k_norm, per-layer RoPE in the
real KV cache).
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
           "llamacpp": {"preset": "Q8_0"}, "awq": {"bits": 8, "group_size": -1}}
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


# --------------------------------------------------------------------------- Gemma 3: replaced modules keep
# its semantics (scaled embedding, (1 + w) RMSNorm folds), checked before any quantization error is added


@pytest.fixture(scope="module")
def gemma():
    return random_model("gemma3", hidden_size=128, layers=2).model


def _gemma_ids(seed=1, n=40):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma3_ggml_embedding_keeps_embed_scale(gemma, dtype):
    """The GGML embedding gives the original scaled embedding's output for the same (dequantized) weights."""
    from quantbench.kernels import ggml
    from quantbench.methods.kquants import GGMLTensor, embedding_scale

    emb = copy.deepcopy(gemma.get_input_embeddings()).to(dtype)
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding"
    scale = embedding_scale(emb)
    assert scale == float(torch.tensor(128**0.5, dtype=dtype))  # sqrt(hidden_size) in the weight's dtype
    x = _gemma_ids()
    for qtype in ("F32", "Q8_0"):
        new = GGMLTensor(torch.from_numpy(ggml.quantize(emb.weight.data.float(), qtype)), qtype,
                         tuple(emb.weight.shape), "embedding", emb.padding_idx, scale)
        new.weight = new.weight.to(dtype)
        ref = copy.deepcopy(emb)
        with torch.no_grad():
            ref.weight.copy_(new.weight)  # the same weights: only the module's semantics may differ
            assert torch.equal(new(x), ref(x)), qtype
            plain = GGMLTensor(new.qdata, qtype, new.shape, "embedding", emb.padding_idx)
            assert not torch.allclose(plain(x).to(dtype), ref(x))  # without the scale it would differ
        if qtype == "F32" and dtype == torch.float32:
            assert torch.equal(new(x), emb(x))  # F32 blocks are exact: the original module's output
        back = GGMLTensor.from_spec(new.save_spec())  # a saved model keeps the scale
        assert back.embed_scale is not None and float(back.embed_scale) == scale


def test_gemma3_llamacpp_embedding_in_model(gemma):
    m = copy.deepcopy(gemma)
    orig = copy.deepcopy(m.get_input_embeddings())
    m = qb.quantize(m, "llamacpp", preset="Q8_0")
    new = m.get_input_embeddings()
    x = _gemma_ids()
    with torch.no_grad():
        orig.weight.copy_(new.weight)
        assert torch.equal(new(x), orig(x))
        assert torch.equal(m.lm_head.weight, new.weight)  # the tied head reads the unscaled rows


def _fold_all(model, fold, wrong=False):
    """Fold random positive scales into every smoothing group (SmoothQuant's or AWQ's); ``wrong``: the plain
    ``weight / s`` fold (what a llama RMSNorm takes)."""
    from quantbench.methods.awq import fold_scales, scale_groups
    from quantbench.methods.smoothquant import find_smooth_groups, fold_smoothing

    g = torch.Generator().manual_seed(0)

    def scales(n):
        return torch.rand(n, generator=g) * 3 + 0.25

    with torch.no_grad():
        if fold == "smoothquant":
            groups = find_smooth_groups(model)
            assert [gr.norm_name.rsplit(".", 1)[-1] for gr in groups] == ["input_layernorm",
                                                                          "pre_feedforward_layernorm"] * 2
            for gr in groups:
                norm, fcs = model.get_submodule(gr.norm_name), [model.get_submodule(n) for n in gr.fc_names]
                s = scales(norm.weight.numel())
                if wrong:
                    norm.weight.div_(s)
                    for fc in fcs:
                        fc.weight.mul_(s)
                else:
                    fold_smoothing(norm, fcs, s)
            return len(groups)
        n = 0
        for block in model.model.layers:
            for gr in scale_groups(block):
                fcs = [block.get_submodule(f) for f in gr.fcs]
                fold_scales(block.get_submodule(gr.prev), fcs, scales(fcs[0].in_features))
                n += 1
        return n


@pytest.mark.parametrize("fold", ["smoothquant", "awq"])
def test_gemma3_folding_leaves_fp_outputs_unchanged(gemma, fold):
    x = _gemma_ids()
    with torch.no_grad():
        ref = gemma(x).logits
        model = copy.deepcopy(gemma)
        n = _fold_all(model, fold)
        out = model(x).logits
    assert n >= 4
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if fold == "smoothquant":  # the fold a llama RMSNorm takes changes Gemma's function
        wrong = copy.deepcopy(gemma)
        _fold_all(wrong, fold, wrong=True)
        with torch.no_grad():
            assert float((wrong(x).logits - ref).norm() / ref.norm()) > 1e-2


def _qwen3():
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_kv_keys_are_hooked_after_k_norm(gemma, arch):
    """Gemma 3 / Qwen 3 normalize keys (k_norm) before RoPE: the key wrapper sees k_norm's output, and with the
    wrappers passing K/V through (record, off) the model computes exactly what the fp model does."""
    from quantbench.kernels.kvcache import KVSpec
    from quantbench.methods import kvquant as kq

    fp = gemma if arch == "gemma3" else _qwen3()
    x = _gemma_ids()
    seen = []
    hooks = [a.k_norm.register_forward_hook(lambda _m, _i, out: seen.append(out)) for a in kq.attention_modules(fp)]
    with torch.no_grad():
        ref = fp(x).logits
    for h in hooks:
        h.remove()
    model = copy.deepcopy(fp)
    kq.install(model, [(KVSpec(), KVSpec()) for _ in kq.attention_modules(model)])
    wrappers = kq.kv_wrappers(model)
    assert len(wrappers) == 2 and all(isinstance(k.inner, kq.NormedKeys) for k, _ in wrappers)
    for mode in ("record", "off"):
        kq.set_mode(model, mode)
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref), mode
    kq.set_mode(model, "qdq")
    hd = model.config.head_dim
    for (k, _), want in zip(wrappers, seen, strict=True):
        got = k.recorded[0]  # [B, T, H * D] from the "record" pass
        if arch == "gemma3":  # k_norm ran on [B, H, T, D]; Qwen 3 calls it on [B, T, H, D]
            want = want.transpose(1, 2)
        assert torch.equal(got, want.reshape(got.shape)), hd
    with torch.no_grad():  # 16-bit K/V: only fp16 rounding of the cached keys and values
        rel = float((model(x).logits - ref).norm() / ref.norm())
    assert rel < 2e-3, rel


def test_gemma3_real_kv_cache_matches_eval_path(gemma):
    """The real cache holds k_norm'd pre-RoPE keys and re-applies each layer's RoPE (Gemma 3: local on sliding
    layers, global on full ones): prefill and decode past the sliding window (64) reproduce the eval path."""
    from quantbench.methods import kvquant as kq
    from quantbench.methods.base import Calibration, build_method

    calib = Calibration(torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(5)), "random", 5)
    m = build_method("kvquant", {"bits": 3, "fisher": False}).quantize(copy.deepcopy(gemma), calib)
    rot = kq.layer_rotaries(m)
    assert isinstance(rot, list) and rot[0].keywords["layer_type"] != rot[1].keywords["layer_type"]
    ids = _gemma_ids(seed=2, n=80)
    with torch.no_grad():
        full = m(ids).logits  # eval path (qdq over the whole sequence)
        cache = kq.make_cache(m)
        kq.set_mode(m, "capture")
        pre = m(ids[:, :64], past_key_values=cache).logits
        steps = [m(ids[:, t : t + 1], past_key_values=cache).logits for t in range(64, 80)]
        kq.set_mode(m, "qdq")
    torch.testing.assert_close(pre, full[:, :64], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 64:], atol=1e-4, rtol=1e-4)


def test_phi3_fused_qkv_kv_slices():
    """Phi-3's fused qkv_proj: the K and V slices of its output are what the wrappers see, the q slice passes
    untouched, and with the wrappers passing K/V through the model computes exactly the fp model's output;
    the real cache reproduces the eval path."""
    from quantbench.methods import kvquant as kq
    from quantbench.methods.base import Calibration, build_method

    fp = random_model("phi3", hidden_size=128, layers=2).model
    cfg, x = fp.config, _gemma_ids()
    hd = cfg.hidden_size // cfg.num_attention_heads
    qw, kw = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    seen = []
    hooks = [a.qkv_proj.register_forward_hook(lambda _m, _i, out: seen.append(out)) for a in kq.attention_modules(fp)]
    with torch.no_grad():
        ref = fp(x).logits
    for h in hooks:
        h.remove()
    model = copy.deepcopy(fp)
    kq.install(model, [(kq.KVSpec(), kq.KVSpec()) for _ in kq.attention_modules(model)])
    wrappers = kq.kv_wrappers(model)
    assert len(wrappers) == 2
    for mode in ("record", "off"):
        kq.set_mode(model, mode)
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref), mode
    for (k, v), qkv in zip(wrappers, seen, strict=True):
        assert torch.equal(k.recorded[0], qkv[..., qw : qw + kw]) and torch.equal(v.recorded[0], qkv[..., qw + kw :])
    calib = Calibration(torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(5)), "random", 5)
    m = build_method("kvquant", {"bits": 3, "fisher": False}).quantize(copy.deepcopy(fp), calib)
    ids = _gemma_ids(seed=2, n=80)
    with torch.no_grad():
        full = m(ids).logits
        assert float((full - fp(ids).logits).norm() / full.norm()) > 1e-3  # the keys/values are quantized
        cache = kq.make_cache(m)
        kq.set_mode(m, "capture")
        pre = m(ids[:, :64], past_key_values=cache).logits
        steps = [m(ids[:, t : t + 1], past_key_values=cache).logits for t in range(64, 80)]
        kq.set_mode(m, "qdq")
    torch.testing.assert_close(pre, full[:, :64], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 64:], atol=1e-4, rtol=1e-4)
