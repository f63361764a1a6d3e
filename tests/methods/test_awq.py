"""AWQ: exact folding, the scale search on an outlier channel, whole-model error vs RTN, storage, config."""

import copy

import pytest
import torch
from torch import nn

from quantbench.harness.inputs.models import tiny_llama, tiny_opt
from quantbench.methods.awq import (
    AWQConfig,
    fake_quantize_weight,
    fold_scales,
    scale_groups,
    search_clip,
    search_scale,
)
from quantbench.methods.base import Calibration, ConfigError, build_method, model_storage
from quantbench.methods.gptq import transformer_blocks
from quantbench.methods.qlinear import IntQuantLinear


def calib(n=4, seq=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, 256, (n, seq), generator=g), "random", seed)


def llama_mha(seed=0):
    """tiny_llama's shape without GQA (4/4 heads), so the v_proj -> o_proj group exists."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def randomize_norms(model, seed=1):
    """Non-trivial norm weights (random init leaves them at 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(0.5 + torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("make", [lambda: tiny_llama().model, llama_mha], ids=["gqa", "mha"])
def test_folding_is_exact(make):
    model = make()
    randomize_norms(model)
    tokens = calib().tokens
    ref = logits(model, tokens)
    g = torch.Generator().manual_seed(3)
    n_groups = 0
    for block in transformer_blocks(model)[1]:
        for grp in scale_groups(block):
            fcs = [block.get_submodule(n) for n in grp.fcs]
            s = torch.exp(torch.randn(fcs[0].in_features, generator=g))  # scales spanning ~e^+-3
            fold_scales(block.get_submodule(grp.prev), fcs, s)
            n_groups += 1
    assert n_groups == (6 if make is not llama_mha else 8)  # GQA: v -> o skipped in each of the 2 blocks
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-4, rtol=1e-4)


def test_scale_search_protects_a_dominant_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, 7] *= 50.0  # one dominant input channel
    w = torch.randn(128, 256, generator=g) * 0.05
    s, alpha, losses = search_scale(x, [w], bits=4, group_size=128, n_grid=20)
    assert alpha > 0 and len(losses) == 20
    err_rtn = (x @ fake_quantize_weight(w, 4, 128).t() - x @ w.t()).pow(2).mean()
    err_awq = (x @ (fake_quantize_weight(w * s, 4, 128) / s).t() - x @ w.t()).pow(2).mean()
    assert losses[0] == pytest.approx(float(err_rtn), rel=1e-5)  # alpha = 0 is plain RTN
    assert err_awq < 0.7 * err_rtn, (float(err_awq), float(err_rtn))


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    w[:, 3] = 8.0  # one outlier weight per row inflates each group's range
    lo, hi = search_clip(w, x, 4, 128, 20, 0.5)
    wc = torch.maximum(torch.minimum(w.reshape(64, 2, 128), hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(64, 256)
    err_clip = (x @ fake_quantize_weight(wc, 4, 128).t() - x @ w.t()).pow(2).mean()
    err_rtn = (x @ fake_quantize_weight(w, 4, 128).t() - x @ w.t()).pow(2).mean()
    assert err_clip <= err_rtn


def test_clip_search_picks_the_direct_formulas_argmin_per_row_and_group():
    """The Gram-matrix error equals the direct mean((x q^T - x w^T)^2) per (row, group): same choices."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 256, generator=g)
    w = torch.randn(80, 256, generator=g)  # 80 rows: two chunks of CLIP_CHUNK, the last one short
    w[::7, 5] = 6.0
    lo, hi = search_clip(w, x, 3, 128, 10, 0.5)
    xd, wd = x.double().reshape(96, 2, 128), w.double().reshape(80, 2, 128)
    lo0, hi0 = w.reshape(80, 2, 128).amin(-1), w.reshape(80, 2, 128).amax(-1)
    best = torch.full((80, 2), float("inf"), dtype=torch.float64)
    want_lo, want_hi = lo0.clone(), hi0.clone()
    for i in range(5):
        r = 1 - i / 10
        cw = torch.maximum(torch.minimum(w.reshape(80, 2, 128), (hi0 * r).unsqueeze(-1)), (lo0 * r).unsqueeze(-1))
        q = fake_quantize_weight(cw.reshape(80, 256), 3, 128).double().reshape(80, 2, 128)
        err = (torch.einsum("ngk,ogk->nog", xd, q) - torch.einsum("ngk,ogk->nog", xd, wd)).pow(2).mean(0)
        better = err < best
        best = torch.where(better, err, best)
        want_lo, want_hi = torch.where(better, lo0 * r, want_lo), torch.where(better, hi0 * r, want_hi)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


@pytest.fixture(scope="module")
def quantized():
    base = tiny_llama().model
    randomize_norms(base)
    cal = calib()
    awq = build_method("awq", {})
    q_awq = awq.quantize(copy.deepcopy(base), cal)
    q_rtn = build_method("rtn", {"bits": 4, "group_size": 128}).quantize(copy.deepcopy(base), None)
    return base, cal, awq, q_awq, q_rtn


def test_awq_beats_rtn_on_tiny_llama(quantized):
    base, cal, awq, q_awq, q_rtn = quantized
    ref = logits(base, cal.tokens)
    mse_awq = float((logits(q_awq, cal.tokens) - ref).pow(2).mean())
    mse_rtn = float((logits(q_rtn, cal.tokens) - ref).pow(2).mean())
    print(f"logits MSE on calibration tokens: awq {mse_awq:.4e}  rtn {mse_rtn:.4e}  alphas {awq.artifacts['alphas']}")
    assert mse_awq <= mse_rtn
    assert awq.artifacts["scaled_groups"] == 6 and awq.artifacts["clipped_modules"] == 10
    assert awq.artifacts["quantized_modules"] == 14


def test_storage_equals_rtn(quantized):
    _, _, _, q_awq, q_rtn = quantized
    mods = [m for m in q_awq.modules() if isinstance(m, IntQuantLinear)]
    assert len(mods) == 14 and all(m.bits == 4 and m.group_size == 128 and not m.sym for m in mods)
    s_awq, s_rtn = model_storage(q_awq), model_storage(q_rtn)
    assert s_awq["linear"] == s_rtn["linear"] and s_awq["total"] == s_rtn["total"]


def test_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        AWQConfig(bits=1)
    with pytest.raises(ConfigError, match="group_size"):
        AWQConfig(group_size=0)
    with pytest.raises(ConfigError, match="n_grid"):
        AWQConfig(n_grid=0)
    with pytest.raises(ConfigError, match="max_shrink"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(ConfigError, match="max_tokens"):
        build_method("awq", {"max_tokens": 0})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_method("awq", {"alpha": 0.5})
    with pytest.raises(ConfigError, match="calibration"):
        build_method("awq", {}).quantize(tiny_llama().model, None)
    with pytest.raises(ConfigError, match="input_layernorm.*post_attention_layernorm.*gate_proj"):
        build_method("awq", {}).quantize(tiny_opt().model, calib())


def test_block_without_llama_modules_is_named():
    block = nn.Module()
    block.input_layernorm = nn.LayerNorm(8)
    with pytest.raises(ConfigError, match="self_attn.q_proj"):
        scale_groups(block)


def test_clipping_with_a_short_last_group_as_smollm2_has():
    # SmolLM2: in_features 576 = 4.5 x 128; the last group is shorter, as in RTN's grid
    from quantbench.methods.awq import apply_clip, fake_quantize_weight, search_clip

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(200, 16, bias=False)
    lin.weight.data = torch.randn(16, 200, generator=g)
    lin.weight.data[:, 150] = 8.0  # an outlier in the short group
    x = torch.randn(64, 200, generator=g)
    w0 = lin.weight.data.clone()
    lo, hi = search_clip(w0, x, bits=4, group_size=128, n_grid=20, max_shrink=0.5)
    assert lo.shape == hi.shape == (16, 2)
    apply_clip(lin, lo, hi, 128)
    assert lin.weight.shape == (16, 200)
    err = lambda w: (x @ (fake_quantize_weight(w, 4, 128) - w0).t()).pow(2).mean()  # noqa: E731
    assert err(lin.weight.data) <= err(w0) + 1e-9
    assert torch.equal(lin.weight.data[:, :128].clamp(lo[:, :1], hi[:, :1]), lin.weight.data[:, :128])
