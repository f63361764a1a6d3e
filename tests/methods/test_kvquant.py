"""KV methods end to end on tiny models: eval path, real cache == eval path, Fisher NUQ, chains."""

import copy

import pytest
import torch
import torch.nn.functional as F

from quantbench.harness.inputs.models import tiny_llama, tiny_opt
from quantbench.methods import kvquant as kq
from quantbench.methods.base import Calibration, ConfigError, build_method


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama().model.eval()


def _ids(n=2, T=96, seed=0):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def _calib():
    return Calibration(_ids(2, 96, seed=5), "random", 5)


def _kl(m, ref_logits, ids):
    with torch.no_grad():
        lp = m(ids).logits.log_softmax(-1)
    return F.kl_div(lp, ref_logits.log_softmax(-1), log_target=True, reduction="batchmean").item()


def test_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        build_method("kvquant", {"bits": 5})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_method("kivi", {"group": 4})
    assert build_method("kvquant").target == "kv"


def test_what_each_method_quantizes_is_declared_on_its_class():
    from quantbench.methods.base import METHODS

    kv = {name for name, cls in METHODS.items() if cls.quantizes("kv")}
    assert {"kv-fp16", "kv-uniform", "kivi", "kvquant"} <= kv and not kv & {"fp", "rtn", "gptq", "smoothquant"}
    assert METHODS.get("smoothquant").quantizes("activations") and METHODS.get("rtn").quantizes("weights")
    with pytest.raises(NotImplementedError, match="rtn does not quantize the KV cache"):
        build_method("rtn").make_cache(None)


@pytest.mark.parametrize("name,prm", [("kv-fp16", {}), ("kv-uniform", {"bits": 4, "group_size": 32}),
                                      ("kivi", {"bits": 2, "group_size": 16, "residual_length": 16})])
def test_the_methods_byte_formula_counts_the_cache_it_makes(llama, name, prm):
    m = build_method(name, prm)
    model = m.quantize(copy.deepcopy(llama), None)
    cache = m.make_cache(model)
    m.generate(model, _ids(1, 70, seed=4), 0, cache)
    calc = m.kv_cache_bytes(n_layers=2, n_kv_heads=2, head_dim=64, tokens=70)
    nb = cache.kv_bytes()
    assert {k: nb[k] for k in ("codes", "scales", "fp16", "total")} == {k: calc[k] for k in ("codes", "scales", "fp16",
                                                                                            "total")}


def test_eval_path_orders_methods(llama):
    ids = _ids(1, 128, seed=1)
    with torch.no_grad():
        ref = llama(ids).logits
    kl = {}
    for name, prm in [
        ("kv-fp16", {}),
        ("kv-uniform", {"bits": 2}),
        ("kv-uniform", {"bits": 4}),
        ("kvquant", {"bits": 4}),
        ("kvquant", {"bits": 2}),
    ]:
        meth = build_method(name, prm)
        m = meth.quantize(copy.deepcopy(llama), _calib())
        kl[f"{name}{prm.get('bits', '')}"] = _kl(m, ref, ids)
        assert meth.artifacts["calc_bytes_per_token"] > 0
    assert kl["kv-fp16"] < 1e-6
    assert kl["kvquant4"] < kl["kv-uniform4"] * 1.5 + 1e-5
    assert kl["kvquant2"] < kl["kv-uniform2"]
    assert kl["kvquant4"] < kl["kvquant2"]


@pytest.mark.parametrize(
    "name,prm", [("kvquant", {"bits": 3}), ("kivi", {"bits": 2, "group_size": 16, "residual_length": 16})]
)
def test_real_cache_prefill_and_decode_match_eval_path(llama, name, prm):
    m = build_method(name, prm).quantize(copy.deepcopy(llama), _calib())
    ids = _ids(1, 80, seed=2)
    with torch.no_grad():
        full = m(ids).logits  # eval path (qdq over the whole sequence)
        cache = kq.make_cache(m)
        kq.set_mode(m, "capture")
        pre = m(ids[:, :64], past_key_values=cache).logits
        steps = [m(ids[:, t : t + 1], past_key_values=cache).logits for t in range(64, 80)]
        kq.set_mode(m, "qdq")
        pre_eval = m(ids[:, :64]).logits
    torch.testing.assert_close(pre, pre_eval, atol=1e-4, rtol=1e-4)
    if name == "kvquant":  # per-token quantization: decoding reproduces the full-sequence eval path
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 64:], atol=1e-4, rtol=1e-4)
    nb = cache.kv_bytes()
    assert nb["codes"] > 0
    assert 0 < nb["total"] < 80 * 2 * 2 * 2 * 64 * 2  # smaller than the fp16 cache (2 layers, 2 kv heads)


def test_generate_with_cache_and_latency(llama):
    m = build_method("kvquant", {"bits": 4}).quantize(copy.deepcopy(llama), _calib())
    ids = _ids(1, 32, seed=3)
    times: list[float] = []
    out = kq.generate_with_cache(m, ids, 4, kq.make_cache(m), times)
    assert out.shape == (1, 36) and torch.equal(out[:, :32], ids) and len(times) == 4
    r = kq.decode_ms_per_token(m, context=64, n_new=3)
    f = kq.decode_ms_per_token(m, context=64, n_new=3, quantized=False)
    assert r["p50_ms"] > 0 and f["p50_ms"] > 0
    assert r["kv_bytes"]["total"] < f["kv_bytes"]["total"] / 2


def test_fisher_weights_change_centroids(llama):
    a = build_method("kvquant", {"bits": 2, "fisher": True})
    b = build_method("kvquant", {"bits": 2, "fisher": False})
    a.quantize(copy.deepcopy(llama), _calib())
    b.quantize(copy.deepcopy(llama), _calib())
    ca, cb = a.artifacts["centroids"][0]["k_centroids"], b.artifacts["centroids"][0]["k_centroids"]
    assert len(ca) == 4 and ca != cb
    assert a.artifacts["qnorm"] is True


def test_opt_and_chain_with_gptq():
    torch.manual_seed(0)
    opt = tiny_opt().model.eval()
    m = build_method("kvquant", {"bits": 4}).quantize(copy.deepcopy(opt), _calib())
    ids = _ids(1, 64, seed=4)
    with torch.no_grad():
        ref = opt(ids).logits
    assert _kl(m, ref, ids) < 0.05
    llama = tiny_llama().model.eval()
    w = build_method("gptq", {"bits": 4, "group_size": 64}).quantize(copy.deepcopy(llama), _calib())
    with torch.no_grad():
        w_logits = w(ids).logits
    wk = build_method("kvquant", {"bits": 4}).quantize(w, _calib())
    assert type(wk.model.layers[0].self_attn.k_proj.inner).__name__ == "IntQuantLinear"
    assert 0 < _kl(wk, w_logits, ids) < 0.05


def test_calibration_recording_is_reused_only_for_the_same_model_and_tokens(llama):
    kq.clear_record_cache()
    first = build_method("kvquant", {"bits": 4})
    m4 = first.quantize(copy.deepcopy(llama), _calib())
    assert first.artifacts["calib_recording_reused"] is False
    # another bit width on a fresh copy of the same model: the K/V and Fisher grads are reused
    second = build_method("kvquant", {"bits": 2})
    m2 = second.quantize(copy.deepcopy(llama), _calib())
    assert second.artifacts["calib_recording_reused"] is True
    # and give the same specs as a recording from scratch
    kq.clear_record_cache()
    fresh = build_method("kvquant", {"bits": 2})
    m2b = fresh.quantize(copy.deepcopy(llama), _calib())
    assert fresh.artifacts["calib_recording_reused"] is False
    for (ka, va), (kb, vb) in zip(kq.model_specs(m2), kq.model_specs(m2b), strict=True):
        assert torch.equal(ka.centroids, kb.centroids) and torch.equal(va.centroids, vb.centroids)
        assert torch.equal(ka.lo, kb.lo) and torch.equal(ka.hi, kb.hi)
    # a changed weight, other tokens or Fisher off: recorded again
    other = copy.deepcopy(llama)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    other_tokens = Calibration(_ids(2, 96, seed=6), "random", 6)
    for model, calib, prm in [(other, _calib(), {}), (copy.deepcopy(llama), other_tokens, {}),
                              (copy.deepcopy(llama), _calib(), {"fisher": False})]:
        build_method("kvquant", {"bits": 4}).quantize(copy.deepcopy(llama), _calib())  # cache: llama, seed 5
        meth = build_method("kvquant", {"bits": 4, **prm})
        meth.quantize(model, calib)
        assert meth.artifacts["calib_recording_reused"] is False
    assert len(m4.model.layers) == len(llama.model.layers)
    kq.clear_record_cache()


def test_qnorm_assigns_codes_with_the_kmeans_table_and_rescales_the_reconstruction():
    """Q-Norm (2 bits): the spec keeps the k-means centroids for code assignment (identical to the run
    without Q-Norm) and adds a (scale, offset) so the reconstruction has the calibration data's std."""
    from quantbench.kernels.kvcache import nearest_centroid, token_range, value_outlier_mask

    v = 0.35 * torch.randn(300, 2, 16, generator=torch.Generator().manual_seed(3))
    cfg = kq.KVQuantConfig(bits=2, outlier_frac=0.02, fisher=False)
    on, off = kq.calibrate_values(v, None, cfg, True), kq.calibrate_values(v, None, cfg, False)
    assert torch.equal(on.centroids, off.centroids) and off.qnorm is None and on.qnorm is not None
    x = v.permute(1, 0, 2).unsqueeze(0)
    mask = value_outlier_mask(x, cfg.outlier_frac)
    lo, hi = (t.float() for t in token_range(x, mask))
    xn = ((x - (hi + lo) / 2) / ((hi - lo) / 2))[~mask]
    rec = on.table()[nearest_centroid(xn, on.centroids)]
    assert abs(rec.std().item() - xn.std().item()) < 1e-3 and abs(rec.mean().item() - xn.mean().item()) < 1e-3
