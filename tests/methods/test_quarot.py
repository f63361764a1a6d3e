"""QuaRot and naive W4A4: fp equivalence of the rotated model, quantizer formulas, packed layout, int kernel,
KV cache, and rotated vs naive error with planted activation outliers."""

import copy

import pytest
import torch
from torch import nn

from quantbench.kernels.hadamard import random_hadamard_matrix
from quantbench.kernels.w4a4 import (
    fake_quantize_asym,
    pack_int4,
    quantize_per_token_sym,
    sym_codes,
    unpack_int4,
    w4a4_matmul,
    w4a4_matmul_reference,
    weight_scale_sym,
)
from quantbench.methods.base import Calibration, ConfigError, build_method, get_method, model_storage
from quantbench.methods.quarot import QuaRotConfig, RotatedLinear, W4A4Linear


def tiny(hidden=24, inter=48, heads=3, kv_heads=1, layers=2, seed=0, vocab=64):
    """Random llama with non-trivial norm weights (so folding matters); tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def ids(vocab=64, n=20, seed=1):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def calib(vocab=64, n=4, seq=32):
    return Calibration(torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(7)), "rand", 0)


def rel_err(ref, out):
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


SHAPES = {
    # hidden 24 = 12 * 2, intermediate 48 = 12 * 4, 3 heads (no H_3: full-width online Hadamard before o_proj)
    "paley-3heads": dict(hidden=24, inter=48, heads=3, kv_heads=1),
    # hidden 36 (Paley II, q = 17), 3 heads of 12 (Paley I, q = 11), intermediate 72 = 36 * 2
    "paley36": dict(hidden=36, inter=72, heads=3, kv_heads=3),
    # powers of two: the across-heads online Hadamard (4 heads)
    "pow2-4heads": dict(hidden=32, inter=64, heads=4, kv_heads=2),
}


# --------------------------------------------------------------------------- rotation: fp equivalence


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rotated_model_without_quantization_computes_the_same_logits(shape):
    m = tiny(**SHAPES[shape])
    x = ids()
    with torch.no_grad():
        ref = m(x, output_hidden_states=True)
    q = build_method("quarot", {"w_bits": 16, "a_bits": 16, "kv_bits": 16, "seed": 5}).quantize(copy.deepcopy(m), None)
    with torch.no_grad():
        out = q(x, output_hidden_states=True)
    assert (out.logits - ref.logits).abs().max() < 1e-4
    # the residual stream really is rotated: h' = h Q (a no-op rotation would fail this)
    Q = random_hadamard_matrix(m.config.hidden_size, seed=5).float()
    h, h_rot = ref.hidden_states[1], out.hidden_states[1]
    assert (h_rot - h @ Q).abs().max() < 1e-4
    assert (h_rot - h).abs().max() > 1e-2
    # untied lm_head, pure RMSNorms, online Hadamards installed
    assert q.lm_head.weight is not q.model.embed_tokens.weight
    assert not q.config.tie_word_embeddings
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in q.model.layers)
    mlp = q.model.layers[0].mlp
    assert isinstance(mlp.down_proj, RotatedLinear) and mlp.down_proj.had_outer == m.config.intermediate_size


def test_rotated_model_generates_the_same_tokens_through_a_cache():
    m = tiny(**SHAPES["pow2-4heads"])
    q = build_method("quarot", {"w_bits": 16, "a_bits": 16, "kv_bits": 16}).quantize(copy.deepcopy(m), None)
    x = ids(n=8)[:1]
    a = m.generate(x, max_new_tokens=6, do_sample=False)
    b = q.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- quantizer formulas


def test_symmetric_per_token_quantizer_by_hand():
    x = torch.tensor([[1.2, -0.8, 0.4, -2.8], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_per_token_sym(x, 4, 1.0)  # xmax 2.8 -> scale 0.4
    assert torch.allclose(s, torch.tensor([0.4, 1.0]))
    assert q.tolist() == [[3, -2, 1, -7], [0, 0, 0, 0]]
    q, s = quantize_per_token_sym(x[:1], 4, 0.5)  # clip: xmax 1.4 -> scale 0.2; -14 clamps to -8
    assert torch.allclose(s, torch.tensor([0.2]))
    assert q.tolist() == [[6, -4, 2, -8]]


def test_asymmetric_kv_quantizer_by_hand():
    x = torch.tensor([[-1.0, 0.0, 1.0, 3.0]])
    # clip 0.5: xmax 1.5, xmin -0.5, scale 2/3, zero round(0.75) = 1; codes clamp(round(x/s) + 1, 0, 3)
    # -1 -> round(-1.5) + 1 = -1 -> 0; 0 -> 1; 1 -> round(1.5) + 1 = 3; 3 -> round(4.5) + 1 = 5 -> 3
    s = 2 / 3
    want = torch.tensor([[(0 - 1) * s, 0.0, (3 - 1) * s, (3 - 1) * s]])
    assert torch.allclose(fake_quantize_asym(x, 2, 0.5), want)
    # groups along the last dimension: each group has its own range
    y = torch.tensor([[0.0, 3.0, 10.0, 13.0]])
    assert torch.allclose(fake_quantize_asym(y, 2, 1.0, group=2), y)


def test_weight_clipping_search_matches_a_brute_force_reference():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[:, 0] *= 6  # an outlier column: clipping pays
    s = weight_scale_sym(w, 4, mse=True)
    for r in range(w.shape[0]):
        row = w[r : r + 1].double()
        amax = float(row.abs().max())
        best, best_s = float("inf"), None
        for i in range(80):
            cand = torch.tensor([amax * (1 - i / 100) / 7]).half().float()
            e = float((sym_codes(row, cand, 4).double() * cand.double() - row).abs().pow(2.4).sum())
            if e < best:
                best, best_s = e, float(cand)
        assert float(s[r]) == pytest.approx(best_s, rel=1e-3)
    assert bool((s <= weight_scale_sym(w, 4, mse=False) + 1e-6).all())


def test_packed_int4_layout_is_exact():
    q = torch.tensor([[1, -1, 7, -8], [0, 3, -5, 2]], dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8
    assert p.tolist() == [[0x1 | 0xF << 4, 0x7 | 0x8 << 4], [0x0 | 0x3 << 4, 0xB | 0x2 << 4]]
    assert torch.equal(unpack_int4(p), q)
    r = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(r)), r)
    every = torch.arange(256, dtype=torch.uint8)  # the CPU byte table == the nibble arithmetic, every byte
    lo, hi = (every & 15).to(torch.int8), (every >> 4).to(torch.int8)
    ref = torch.stack([torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)], -1).reshape(512)
    assert torch.equal(unpack_int4(every), ref) and unpack_int4(every).dtype == torch.int8


def test_int_kernel_equals_the_float_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g)
    x = torch.randn(2, 7, 96, generator=g)
    lin = W4A4Linear.from_weight(w, 4, 4, 0.9, mse=True)
    xq, xs = quantize_per_token_sym(x.reshape(-1, 96), 4, 0.9)
    ref = w4a4_matmul_reference(xq, xs, lin.qweight, lin.weight_scale)
    assert torch.allclose(w4a4_matmul(xq, xs, lin.qweight, lin.weight_scale), ref, rtol=1e-5, atol=1e-5)
    y_int = lin(x)
    lin.packed = False
    y_sim = lin(x)
    assert torch.allclose(y_int.reshape(-1, 48), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(y_sim, y_int, rtol=1e-4, atol=1e-5)
    # quantized: close to the float product but not equal
    fp = x @ w.T
    assert 1e-4 < rel_err(fp, y_int) < 0.1


def test_storage_is_four_bits_plus_an_fp16_scale_per_channel():
    lin = W4A4Linear.from_weight(torch.randn(1536, 576), 4, 4, 0.9, mse=False)
    st = lin.storage()
    assert st.packed_weights == 1536 * 576 // 2 and st.scales_zeros == 1536 * 2
    assert 8 * (st.packed_weights + st.scales_zeros) / st.quantized_weights == pytest.approx(4 + 16 / 576)


# --------------------------------------------------------------------------- the methods


def test_config_validation_and_registry():
    assert get_method("quarot").quantizes("kv") and get_method("w4a4").quantizes("activations")
    assert QuaRotConfig().kv_bits == 4 and QuaRotConfig().a_clip_ratio == 0.9 and QuaRotConfig().kv_clip_ratio == 0.95
    with pytest.raises(ConfigError, match="w_bits"):
        build_method("quarot", {"w_bits": 3})
    with pytest.raises(ConfigError, match="weights"):
        build_method("w4a4", {"weights": "awq"})
    with pytest.raises(ConfigError, match="a_clip_ratio"):
        build_method("quarot", {"a_clip_ratio": 1.5})
    assert build_method("quarot", {"weights": "gptq"}).needs_calibration
    assert not build_method("quarot", {}).needs_calibration


def test_quantized_modules_and_bits_per_weight():
    m = tiny(**SHAPES["pow2-4heads"])
    q = build_method("quarot", {}).quantize(copy.deepcopy(m), None)
    layer = q.model.layers[0]
    for mod in (layer.self_attn.q_proj, layer.mlp.down_proj, layer.self_attn.o_proj):
        assert isinstance(mod, W4A4Linear) and mod.a_bits == 4
    assert layer.mlp.down_proj.had_outer == 64
    assert (layer.self_attn.o_proj.had_outer, layer.self_attn.o_proj.had_inner) == (4, 8)
    st = model_storage(q)["linear"]
    assert 8 * st.total / st.quantized_weights == pytest.approx(4 + 16 / 32, rel=0.05)
    assert isinstance(q.lm_head, nn.Linear) and q.lm_head.weight.dtype == torch.float32


def plant_residual_outliers(model, channels=(3, 17, 30), gain=30.0):
    """Outlier channels in the residual stream (as LLMs' massive activations): a few embedding columns scaled
    up, lm_head untied first so the logits are not read from the scaled columns.  Every block's normalized
    input then carries the outlier channels, which dominate a per-token activation scale."""
    with torch.no_grad():
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        model.model.embed_tokens.weight[:, list(channels)] *= gain


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_rotation_beats_naive_w4a4_with_activation_outliers(weights):
    m = tiny(hidden=64, inter=128, heads=4, kv_heads=2, layers=2, vocab=128)
    plant_residual_outliers(m)
    x = ids(vocab=128, n=24)
    with torch.no_grad():
        ref = m(x).logits
    errs = {}
    for name in ("w4a4", "quarot"):
        for setting, params in (("a4", {"w_bits": 16, "kv_bits": 16}), ("w4a4kv4", {"kv_bits": 4})):
            if weights == "gptq" and setting == "a4":
                continue
            meth = build_method(name, {"weights": weights, **params})
            q = meth.quantize(copy.deepcopy(m), calib(vocab=128) if weights == "gptq" else None)
            with torch.no_grad():
                errs[name, setting] = rel_err(ref, q(x).logits)
    if weights == "rtn":  # the activation quantization error alone: rotation removes most of it
        assert errs["quarot", "a4"] * 3 < errs["w4a4", "a4"], errs
    assert errs["quarot", "w4a4kv4"] < 0.7 * errs["w4a4", "w4a4kv4"], errs


def test_gptq_weights_are_at_least_as_good_as_rtn_on_the_layer_objective():
    m = tiny(hidden=64, inter=128, heads=4, kv_heads=2, layers=1, vocab=128)
    x = ids(vocab=128, n=32)
    with torch.no_grad():
        ref = m(x).logits
    out = {}
    for weights in ("rtn", "gptq"):
        meth = build_method("quarot", {"weights": weights, "a_bits": 16, "kv_bits": 16})
        q = meth.quantize(copy.deepcopy(m), calib(vocab=128, n=8))
        assert isinstance(q.model.layers[0].mlp.down_proj, W4A4Linear)
        assert q.model.layers[0].mlp.down_proj.had_outer == 128  # the online Hadamard survives GPTQ
        with torch.no_grad():
            out[weights] = rel_err(ref, q(x).logits)
    assert out["gptq"] < 1.2 * out["rtn"], out
    assert out["gptq"] < 0.05


# --------------------------------------------------------------------------- KV cache


def test_kv_cache_holds_packed_codes_and_matches_the_formula():
    m = tiny(**SHAPES["pow2-4heads"])
    meth = build_method("quarot", {"kv_bits": 4})
    q = meth.quantize(copy.deepcopy(m), None)
    x = ids(n=16)[:1]
    with torch.no_grad():
        ref = q(x).logits  # evaluation path: K/V quantize-dequantized in the attention
        cache = meth.make_cache(q)
        out = q(x, past_key_values=cache, use_cache=True).logits
    # the cache re-stores the already quantized K/V on the same 16-level grid (fp16 values, scale, zero): well below
    # the error of the KV quantization itself
    with torch.no_grad():
        q.model.layers[0].self_attn.quarot_kv_bits = 16
        no_kv_layer0 = q(x).logits
        q.model.layers[0].self_attn.quarot_kv_bits = 4
    assert rel_err(ref, out) < 0.3 * rel_err(ref, no_kv_layer0)
    nb = cache.kv_bytes()
    L, H, D, T = 2, 2, 8, 16
    want = meth.kv_cache_bytes(n_layers=L, n_kv_heads=H, head_dim=D, tokens=T)
    assert nb["codes"] == want["codes"] == 2 * L * H * T * D // 2
    assert nb["scales"] == want["scales"] == 2 * L * H * T * 4
    assert build_method("quarot", {"kv_bits": 16}).kv_cache_bytes(n_layers=L, n_kv_heads=H, head_dim=D,
                                                                  tokens=T)["fp16"] == 2 * L * H * T * D * 2


def test_cache_holds_hadamard_rotated_post_rope_keys_and_per_head_rotated_values():
    from transformers.cache_utils import DynamicCache

    from quantbench.kernels.hadamard import hadamard_transform

    m = tiny(**SHAPES["pow2-4heads"])
    q = build_method("quarot", {"w_bits": 16, "a_bits": 16, "kv_bits": 16}).quantize(copy.deepcopy(m), None)
    x = ids(n=10)[:1]
    caches = []
    for model in (m, q):
        c = DynamicCache()
        with torch.no_grad():
            model(x, past_key_values=c, use_cache=True)
        caches.append(c)
    k0, v0 = caches[0].layers[1].keys, caches[0].layers[1].values
    k1, v1 = caches[1].layers[1].keys, caches[1].layers[1].values
    assert torch.allclose(k1, hadamard_transform(k0), atol=1e-5)
    assert torch.allclose(v1, hadamard_transform(v0), atol=1e-5)
    assert (k1 - k0).abs().max() > 1e-2
