"""BitNet b1.58 / BitNet: quantizer formulas, STE, packed vs simulated paths, storage, QAT and its resume."""

import copy
import json

import pytest
import torch
from torch import nn

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods import bitnet as B
from quantbench.methods.base import Calibration, ConfigError, build_method, model_storage


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_absmean_roundclip_hand_computed():
    w = torch.tensor([[0.4, -0.1, 0.0, 1.5], [-0.6, 0.2, -2.0, 0.3]])
    codes, gamma = B.ternary_codes(w)
    # gamma = mean|W| = (0.4+0.1+0+1.5+0.6+0.2+2.0+0.3)/8 = 0.6375; W/gamma = .627 -.157 0 2.35 | -.941 .314 -3.14 .471
    assert gamma.item() == pytest.approx(0.6375)
    assert codes.tolist() == [[1, 0, 0, 1], [-1, 0, -1, 0]]
    codes_c, gamma_c = B.ternary_codes(w, "channel")
    # rows: gamma = 0.5, 0.775 -> .8 -.2 0 3 | -.774 .258 -2.58 .387
    assert gamma_c.view(-1).tolist() == pytest.approx([0.5, 0.775])
    assert codes_c.tolist() == [[1, 0, 0, 1], [-1, 0, -1, 0]]
    codes_g, gamma_g = B.ternary_codes(w, "group", group_size=2)
    assert gamma_g.view(-1).tolist() == pytest.approx([0.25, 0.75, 0.4, 1.15])
    # groups: .4/.25=1.6->1, -.1/.25=-.4->0, 0, 1.5/.75=2->1 | -.6/.4=-1.5->-2->clip -1, .5->0, -2/1.15->-1, .26->0
    assert codes_g.tolist() == [[1, 0, 0, 1], [-1, 0, -1, 0]]


def test_binary_sign_with_centralization():
    w = torch.tensor([[0.3, 0.1, -0.2, 0.6]])  # mean 0.2 -> W - alpha = .1 -.1 -.4 .4
    codes, beta = B.binary_codes(w)
    assert codes.tolist() == [[1, -1, -1, 1]]
    assert beta.item() == pytest.approx(0.3)
    assert B.binary_codes(w, centralize=False)[0].tolist() == [[1, 1, -1, 1]]


def test_ste_gradients_pass_through():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    bl = B.BitLinear.from_linear(lin)
    x = torch.randn(4, 16, requires_grad=True)
    bl(x).sum().backward()
    wq = B.weight_quant(lin.weight.data, "ternary", "tensor", 128)
    xq = B.act_quant(x.detach())
    # STE: d/dW = grad_out^T @ x_q (identity through Q), d/dx = grad_out @ W_q
    torch.testing.assert_close(bl.weight.grad, torch.ones(4, 8).T @ xq)
    torch.testing.assert_close(x.grad, torch.ones(4, 8) @ wq)
    # forward is the quantized product; lambda = 0 is the fp layer
    torch.testing.assert_close(bl(x), xq @ wq.T)
    bl.lam = 0.0
    torch.testing.assert_close(bl(x), lin(x))


@pytest.mark.parametrize("fmt,granularity", [("2bit", "tensor"), ("base3", "channel"), ("2bit", "group")])
def test_packed_matches_simulated_and_bitlinear(fmt, granularity):
    torch.manual_seed(1)
    lin = nn.Linear(256, 64, bias=True)
    q = B.to_packed(lin, "ternary", fmt, granularity, 64, 8)
    x = torch.randn(3, 256)
    y_packed = q(x)
    q.packed = False
    y_sim = q(x)
    bl = B.BitLinear.from_linear(lin, granularity=granularity, group_size=64)
    torch.testing.assert_close(y_packed, y_sim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_packed, bl(x), rtol=1e-5, atol=1e-5)


def test_storage_from_buffers():
    lin = nn.Linear(576, 1536, bias=False)
    for fmt, nbytes in [("2bit", 1536 * 144), ("base3", 1536 * 116)]:
        s = B.to_packed(lin, "ternary", fmt, "tensor", 128, 8).storage()
        assert (s.packed_weights, s.scales_zeros, s.quantized_weights) == (nbytes, 4, 576 * 1536)
    s = B.to_packed(lin, "1bit", "1bit", "tensor", 128, 8).storage()
    assert s.packed_weights == 1536 * 72
    assert 576 * 1536 * 2 / B.to_packed(lin, "ternary", "2bit", "tensor", 128, 8).storage().total == pytest.approx(
        8.0, rel=1e-4)


@pytest.mark.parametrize("name", ["bitnet-ptq", "bitnet-1bit"])
def test_ptq_methods_whole_model(name):
    lm = tiny_llama()
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    q = build_method(name).quantize(copy.deepcopy(lm.model), None)
    packed = sum(isinstance(m, B.TernaryLinear) for m in q.modules())
    assert packed == 14
    st = model_storage(q)["linear"]
    bits = 8 * st.total / st.quantized_weights
    assert bits == pytest.approx(2.0 if name == "bitnet-ptq" else 1.0, abs=0.01)
    assert torch.isfinite(q(ids).logits).all()


def test_config_errors():
    with pytest.raises(ConfigError):
        build_method("bitnet-ptq", {"fmt": "3bit"})
    with pytest.raises(ConfigError):
        build_method("bitnet-qat", {"steps": 0})
    with pytest.raises(ConfigError):
        build_method("bitnet-qat", {"granularity": "row"})


def _qat(tmp=None, **kw):
    torch.manual_seed(0)
    lm = tiny_llama()
    calib = Calibration(tokens=torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0)),
                        dataset="rand", seed=0)
    params = dict(steps=20, seq_len=32, batch_size=2, warmup=5, lr=2e-3, checkpoint_every=5)
    params.update(kw)
    meth = build_method("bitnet-qat", params)
    meth.artifact_dir = tmp
    model = meth.quantize(lm.model, calib)
    return meth, model, calib


def test_qat_loss_decreases_and_packs(tmp_path):
    meth, model, calib = _qat(tmp_path)
    curve = meth.artifacts["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, 21))
    first, last = sum(v for _, v in curve[:3]) / 3, sum(v for _, v in curve[-3:]) / 3
    assert last < first - 0.1
    assert json.loads((tmp_path / "loss_curve.json").read_text()) == curve
    assert sum(isinstance(m, B.TernaryLinear) for m in model.modules()) == 14
    assert sorted(p.name for p in tmp_path.glob("qat_step*")) == ["qat_step20.json", "qat_step20.safetensors"]


def test_qat_resume_equals_uninterrupted(tmp_path):
    ref_meth, ref_model, _ = _qat(tmp_path / "ref", steps=12)
    # interrupted run: 8 of 12 steps (same config except steps would change the config; simulate the crash)
    part = tmp_path / "part"
    orig = B.BitNetQAT._save
    calls = []

    def crash_after_second(self, step, *a):
        orig(self, step, *a)
        calls.append(step)
        if step == 10:
            raise KeyboardInterrupt

    B.BitNetQAT._save = crash_after_second
    try:
        with pytest.raises(KeyboardInterrupt):
            _qat(part, steps=12)
    finally:
        B.BitNetQAT._save = orig
    assert calls == [5, 10]
    meth, model, _ = _qat(part, steps=12)
    assert meth.artifacts["loss_curve"] == ref_meth.artifacts["loss_curve"]
    sd, ref_sd = model.state_dict(), ref_model.state_dict()
    for k in ref_sd:
        assert torch.equal(sd[k], ref_sd[k]), k


def test_qat_cycles_short_calibration():
    ids = B.qat_batch(torch.arange(100).view(2, 50), step=3, batch_size=2, seq_len=30)
    # 100 tokens -> 3 rows of 30; step 3 takes rows 6 % 3 = 0 and 7 % 3 = 1
    assert ids.tolist() == [list(range(0, 30)), list(range(30, 60))]


def test_load_bitnet_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "BitNetForCausalLM"):
        pytest.skip("transformers has no BitNet architecture")
    cfg = transformers.BitNetConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.BitNetForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = B.load_bitnet_checkpoint(tmp_path)
    packed = [m for m in model.modules() if isinstance(m, B.TernaryLinear)]
    assert len(packed) == 2 * 7
    # same numbers as the fp model whose linears are BitLinears (ternary weights, int8 activations)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, B.BitLinear.from_linear(mod))
    ids = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)


def test_bitlinear_forward_is_norm_then_int8_then_ternary():
    # y = gamma * codes(W) @ dequant(int8(rms_norm(x) * g)), computed by hand
    w = torch.tensor([[0.5, -0.5, 0.0, 1.0], [0.25, 0.25, -0.25, 0.5]])
    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data.copy_(w)
    bl = B.BitLinear.from_linear(lin, norm="rms")
    bl.norm_weight.data.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0]))
    # rms([10, -10, 10, -10]) = 10 -> n = [1, -1, 1, -1]; * g = [1, -.5, 2, -1]; absmax 2 -> Q_b = 63.5;
    # int8 = round([63.5, -31.75, 127, -63.5]) = [64, -32, 127, -64] (ties to even)
    # gamma = mean|W| = 3.25 / 8 = .40625; W / gamma -> codes [1, -1, 0, 1], [1, 1, -1, 1]
    # y = gamma / Q_b * [64 + 32 + 0 - 64, 64 - 32 - 127 - 64] = .40625 / 63.5 * [32, -159]
    x = torch.tensor([[10.0, -10.0, 10.0, -10.0], [0.1, -0.1, 0.1, -0.1]])
    y = bl(x)
    want = torch.tensor([32.0, -159.0]) * 0.40625 / 63.5
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=0)
    # the norm removes the per-token scale: x / 100 gives the same output (up to the norm's eps)
    torch.testing.assert_close(y[1], want, rtol=1e-3, atol=0)
    # the packed inference module computes the same, its gain stored as an fp32 buffer
    q = B.to_packed(bl, "ternary", "2bit", "tensor", 128, 8)
    assert q.norm == "rms" and torch.equal(q.norm_weight, bl.norm_weight.data)
    torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-7)
    assert q.storage().unquantized == 4 * 4


def test_layer_norm_variant_and_gain_init():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, centred [-2, -1, 0, 3], var 14 / 4 = 3.5
    n = B.bitlinear_norm(x, "layer")
    torch.testing.assert_close(n, torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / (3.5 + B.NORM_EPS) ** 0.5)
    assert torch.equal(B.bitlinear_norm(x, "none"), x)
    # tokens s_t * u (one direction, varying scale): rms_norm gives u / rms(u) for all of them and the
    # least-squares gain is rms(u) * mean(s_t), i.e. g * n reproduces the average token
    u = torch.tensor([1.0, -2.0, 0.5, 2.0])
    s = torch.tensor([0.5, 1.0, 4.5])
    g = B.norm_gain_init(*B.norm_gain_sums(s[:, None] * u, "rms"))
    r = u.pow(2).mean().sqrt()
    torch.testing.assert_close(g, r * s.mean() * torch.ones(4), rtol=1e-4, atol=0)  # up to the norm's eps


def test_qat_trains_norm_gains_from_least_squares_init():
    lm = tiny_llama()
    ref = copy.deepcopy(lm.model)
    calib = Calibration(tokens=torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0)),
                        dataset="rand", seed=0)
    meth = build_method("bitnet-qat", dict(steps=3, seq_len=32, batch_size=2, warmup=2, lr=2e-3))
    init = {}
    orig = B.BitNetQAT.__dict__["_init_norm_gains"]  # the staticmethod itself

    def spy(model, bitlins, tokens, c):
        orig(model, bitlins, tokens, c)
        init.update({n: bl.norm_weight.detach().clone() for n, bl in bitlins.items()})

    B.BitNetQAT._init_norm_gains = staticmethod(spy)
    try:
        model = meth.quantize(lm.model, calib)
    finally:
        B.BitNetQAT._init_norm_gains = orig
    packed = {n: m for n, m in model.named_modules() if isinstance(m, B.TernaryLinear)}
    assert len(packed) == 14 and all(m.norm == "rms" for m in packed.values())
    # the init is the least-squares gain of each linear's input in the fp model
    name = "model.layers.0.self_attn.o_proj"
    xs = []
    h = ref.get_submodule(name).register_forward_pre_hook(lambda _m, a: xs.append(a[0]))
    with torch.no_grad():
        ref(input_ids=B.qat_batch(calib.tokens, 0, 8, 32))
    h.remove()
    torch.testing.assert_close(init[name], B.norm_gain_init(*B.norm_gain_sums(torch.cat(xs), "rms")))
    # then trained: the stored gain moved from its init
    assert not torch.equal(packed[name].norm_weight, init[name])
