"""OBQ: the batched solver against a from-scratch transcription of the greedy loop; loss vs GPTQ and RTN."""

import copy

import numpy as np
import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.base import Calibration, ConfigError, build_method
from quantbench.methods.gptq_solver import find_params, gptq_quantize, prepare_hessian
from quantbench.methods.obq import obq_quantize
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.rtn import rtn_quantize_weight


def _layer(rows, cols, seed, n=None):
    """A weight and H = 2 X X^T / n of correlated inputs (a random mixing of iid features)."""
    g = torch.Generator().manual_seed(seed)
    n = n or 8 * cols
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5)
    H = 2 * X.t() @ X / n
    W = torch.randn(rows, cols, generator=g)
    return W, H


def _brute_force_obq(W, H, scales, zeros, g_idx, bits, percdamp, outliers_first):
    """The greedy loop as the paper states it, one row at a time, H_F^-1 recomputed from H[F, F] each step."""
    W = W.double().numpy()
    H = H.double().numpy()
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    maxq = 2**bits - 1
    rows, cols = W.shape
    Q = np.zeros_like(W)
    orders = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        w = W[r].copy()
        s = scales[r, g_idx].double().numpy()
        z = zeros[r, g_idx].double().numpy()
        F = list(range(cols))
        for step in range(cols):
            Hinv = np.linalg.inv(H[np.ix_(F, F)])
            wf = w[F]
            qf = s[F] * (np.clip(np.round(wf / s[F]) + z[F], 0, maxq) - z[F])
            scores = (wf - qf) ** 2 / np.diag(Hinv)
            k = int(np.argmin(scores))
            err = (wf - qf) ** 2
            if outliers_first and (err > 0.25 * s[F] ** 2).any():
                k = int(np.argmax(err))  # weights pushed off the grid go first, the worst first
            q = F[k]
            w[F] -= (wf[k] - qf[k]) / Hinv[k, k] * Hinv[:, k]
            w[q] = qf[k]
            Q[r, q] = qf[k]
            orders[r, step] = q
            F.pop(k)
    return Q, orders


def _loss(W, Q, H, percdamp=0.01):
    """(W - Q) H (W - Q)^T / 2 summed over rows, with H dampened as the solvers do (GPTQ's loss)."""
    Hd, Wd = prepare_hessian(H, W, percdamp)
    E = (Wd - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, Hd.double(), E)) / 2


@pytest.mark.parametrize("group_size,bits,outliers_first", [(-1, 3, False), (3, 2, False), (-1, 2, True), (3, 3, True)])
def test_solver_equals_brute_force_greedy_loop(group_size, bits, outliers_first):
    W, H = _layer(8, 6, seed=0)
    r = obq_quantize(W, H, bits, group_size, percdamp=0.01, batch_rows=3, outliers_first=outliers_first,
                     dtype=torch.float64)
    gs = 6 if group_size == -1 else group_size
    g_idx = torch.arange(6) // gs
    # grids: min-max on the original row (per group), as find_params computes them
    for g in range(6 // gs):
        s, z = find_params(W[:, g * gs : (g + 1) * gs], bits, False)
        assert torch.equal(r.scales[:, g], s) and torch.equal(r.zeros[:, g], z)
    Q_ref, order_ref = _brute_force_obq(W, H, r.scales, r.zeros, g_idx, bits, 0.01, outliers_first)
    assert np.array_equal(r.order.numpy(), order_ref)
    np.testing.assert_allclose(r.Q.double().numpy(), Q_ref, rtol=0, atol=1e-6)
    # codes decode to Q; the per-weight losses sum to GPTQ's layer loss definition
    assert torch.allclose(r.scales[:, g_idx] * (r.codes.float() - r.zeros[:, g_idx]), r.Q, atol=1e-6)
    assert float(r.losses.sum()) == pytest.approx(_loss(W, r.Q, H), rel=1e-5)


def test_float32_solver_matches_float64():
    W, H = _layer(16, 24, seed=3)
    r32 = obq_quantize(W, H, 4, -1, batch_rows=5)
    r64 = obq_quantize(W, H, 4, -1, batch_rows=16, dtype=torch.float64)
    assert (r32.codes == r64.codes).float().mean() > 0.99
    assert float(r32.losses.sum()) == pytest.approx(float(r64.losses.sum()), rel=1e-3)


def test_obq_loss_at_most_gptq_and_rtn_on_correlated_inputs():
    ratios_gptq, ratios_rtn = [], []
    for seed in range(6):
        W, H = _layer(24, 48, seed=10 + seed)
        obq = _loss(W, obq_quantize(W, H, 3, -1).Q, H)
        g = gptq_quantize(W, H, 3, -1, act_order=True)
        gptq = _loss(W, g.Q, H)
        assert float(g.losses.sum()) == pytest.approx(gptq, rel=1e-3)  # one loss definition for both
        codes, s, z = rtn_quantize_weight(W, 3, -1, False)
        rtn = _loss(W, s * (codes.float() - z), H)
        ratios_gptq.append(obq / gptq)
        ratios_rtn.append(obq / rtn)
        assert gptq < rtn
    print("obq/gptq per seed:", [f"{x:.3f}" for x in ratios_gptq])
    # greedy order beats GPTQ's fixed (act-order) order on average and on most seeds (measured: 0.84-0.99);
    # not a theorem: on badly conditioned H (e.g. mixing without the 1/sqrt(cols)) it can lose on some seeds
    assert np.mean(ratios_gptq) < 0.97
    assert sum(x < 1 for x in ratios_gptq) >= 5
    assert max(ratios_rtn) < 1.0


def _calib(vocab, n, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, vocab, (n, seq), generator=g), "random", seed)


def test_method_on_tiny_model_packs_codes_and_records_losses():
    torch.set_num_threads(1)
    model = tiny_llama().model.eval()
    calib = _calib(256, 4, 32, 1)
    ev = _calib(256, 2, 32, 2).tokens
    with torch.no_grad():
        ref = model(ev).logits
    errs = {}
    for name, params in (("rtn", {"bits": 4, "group_size": -1}), ("obq", {"bits": 4, "device": "cpu"})):
        m = build_method(name, params)
        q = m.quantize(copy.deepcopy(model), calib)
        with torch.no_grad():
            errs[name] = (q(ev).logits - ref).pow(2).mean().item()
    quantized = [n for n, mod in q.named_modules() if isinstance(mod, IntQuantLinear)]
    assert len(quantized) == m.artifacts["quantized_modules"] == len(m.artifacts["layer_losses"]) > 0
    assert all(v > 0 for v in m.artifacts["layer_losses"].values())
    assert m.artifacts["quantize_seconds"] > 0
    assert errs["obq"] < errs["rtn"]
    # max_layers: only the first selected linears, in block order
    m2 = build_method("obq", {"bits": 4, "max_layers": 2, "include": ["*layers.0.*"], "device": "cpu"})
    q2 = m2.quantize(copy.deepcopy(model), calib)
    assert [n for n, mod in q2.named_modules() if isinstance(mod, IntQuantLinear)] == quantized[:2]


def test_bad_config():
    with pytest.raises(ConfigError, match="obq: bits"):
        build_method("obq", {"bits": 5})
    with pytest.raises(ConfigError, match="max_layers"):
        build_method("obq", {"max_layers": 0})


def test_greedy_order_defers_outlier_features_like_reverse_act_order():
    """A few large input features (as in LLMs): their columns score worst (err / [H_F^-1]_qq with tiny
    [H^-1]_qq) and are quantized last, so OBQ's order is close to reverse act-order (ascending diag H) and
    loses to GPTQ's act-order (descending).  Measured (seeds 0-3): OBQ 3435-4557, GPTQ act-order
    2092-3004, GPTQ reverse act-order 3437-4870; outlier columns at mean step 59-62 of 64."""
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(512, 64, generator=g) @ (torch.eye(64) + torch.randn(64, 64, generator=g) / 8)
        X[:, :4] *= 30
        H = 2 * X.t() @ X / 512
        W = torch.randn(16, 64, generator=g)
        r = obq_quantize(W, H, 3, -1, dtype=torch.float64)
        assert torch.argsort(r.order, dim=1)[:, :4].double().mean() > 56  # the 4 outlier columns go (nearly) last
        asc = torch.argsort(torch.diag(H))
        rev = gptq_quantize(W[:, asc], H[asc][:, asc], 3, -1, act_order=False).Q[:, torch.argsort(asc)]
        act = gptq_quantize(W, H, 3, -1, act_order=True).Q
        obq, l_act, l_rev = _loss(W, r.Q, H), _loss(W, act, H), _loss(W, rev, H)
        assert obq > 1.3 * l_act
        assert 0.9 * l_rev < obq < 1.1 * l_rev
