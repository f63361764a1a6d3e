"""mixed: knapsack optimality vs brute force, budget respected as model_storage measures it, allocation."""

import copy
import itertools

import numpy as np
import pytest
import torch

from quantbench.methods.base import Calibration, ConfigError, build_method, linear_weight_count, model_storage
from quantbench.methods.mixed import module_bytes, solve_mckp


def brute_force(costs, values, budget):
    best, arg = np.inf, None
    for picks in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        c = sum(costs[i, j] for i, j in enumerate(picks))
        v = sum(values[i, j] for i, j in enumerate(picks))
        if c <= budget and v < best:
            best, arg = v, picks
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 20, size=(6, 4)).astype(float)
    values = rng.random((6, 4))
    budget = float(rng.integers(int(costs.min(1).sum()), int(costs.max(1).sum()) + 1))
    picks, total = solve_mckp(costs, values, budget, unit=1)
    best, _ = brute_force(costs, values, budget)
    assert total == pytest.approx(best)
    assert sum(values[i, j] for i, j in enumerate(picks)) == pytest.approx(best)
    assert sum(costs[i, j] for i, j in enumerate(picks)) <= budget


def test_knapsack_discretised_budget_is_never_exceeded():
    rng = np.random.default_rng(7)
    costs = rng.random((40, 4)) * 1000 + 10
    values = rng.random((40, 4))
    budget = costs.mean(1).sum()
    picks, total = solve_mckp(costs, values, budget, resolution=500)
    assert sum(costs[i, j] for i, j in enumerate(picks)) <= budget
    best_uniform = min(values[:, j].sum() for j in range(4) if costs[:, j].sum() <= budget)
    assert total <= best_uniform + 1e-12


def test_knapsack_infeasible_raises():
    with pytest.raises(ConfigError):
        solve_mckp(np.array([[5.0, 9.0]]), np.array([[1.0, 0.0]]), 4.0, unit=1)


@pytest.fixture(scope="module")
def tiny():
    from quantbench.harness.inputs.models import tiny_llama

    torch.set_num_threads(1)
    return tiny_llama().model


@pytest.fixture
def calib(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return Calibration(torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3)), "rand", 0)


def _bpw(model):
    return 8 * model_storage(model)["linear"].total / linear_weight_count(model)


@pytest.mark.parametrize("target", [2.4, 3.0, 3.5])
def test_budget_respected_as_model_storage_measures_it(tiny, calib, target):
    m = build_method("mixed", {"target_bpw": target})
    q = m.quantize(copy.deepcopy(tiny), calib)
    bpw = _bpw(q)
    assert bpw <= target
    assert bpw == pytest.approx(m.artifacts["achieved_bpw"])
    # the solver leaves little unused: within the cost step of one module (largest: 2->3 bits of a 512x256)
    assert target - bpw < 0.25
    alloc = m.artifacts["allocation"]
    assert len(alloc) == 14 and set(alloc.values()) <= {2, 3, 4, 8}
    for name, b in alloc.items():
        assert q.get_submodule(name).bits == b
    assert q.get_input_embeddings().weight.dtype == torch.float32  # embeddings / lm_head unquantized


def test_more_bits_less_predicted_sensitivity_and_beats_uniform(tiny, calib):
    preds = []
    for target in (2.5, 3.0, 4.0):
        m = build_method("mixed", {"target_bpw": target})
        m.quantize(copy.deepcopy(tiny), calib)
        preds.append(m.artifacts["predicted_total_sensitivity"])
    assert preds[0] > preds[1] > preds[2]
    # at the bpw uniform 3-bit costs, the allocation is at least as good as uniform 3-bit (a feasible point)
    uni3 = (
        sum(
            module_bytes(lin, 3, 128)
            for n, lin in tiny.named_modules()
            if isinstance(lin, torch.nn.Linear) and "lm_head" not in n
        )
        * 8
        / linear_weight_count(tiny)
    )
    m = build_method("mixed", {"target_bpw": uni3})
    m.quantize(copy.deepcopy(tiny), calib)
    assert m.artifacts["predicted_total_sensitivity"] <= m.artifacts["uniform_sensitivity"]["3"] + 1e-12


def test_large_budget_gives_all_eight_bits(tiny, calib):
    m = build_method("mixed", {"target_bpw": 16.0})
    m.quantize(copy.deepcopy(tiny), calib)
    assert set(m.artifacts["allocation"].values()) == {8}


def test_gptq_inner_and_fisher_respect_budget(tiny, calib):
    for params in ({"inner": "gptq"}, {"sensitivity": "fisher"}):
        m = build_method("mixed", {"target_bpw": 3.0, **params})
        q = m.quantize(copy.deepcopy(tiny), calib)
        assert _bpw(q) <= 3.0
        x = torch.randint(0, 256, (1, 32))
        assert torch.isfinite(q(x).logits).all()


@pytest.mark.parametrize("inner", ["rtn", "gptq"])
def test_mixed_is_its_allocation_through_the_inner_quantizer(tiny, calib, inner):
    """Step 4 is GPTQ's / RTN's own quantize with the allocation as a per-module plan: the same codes."""
    params = {"target_bpw": 3.0, "inner": inner, "group_choices": [64, 128], "sensitivity": "fisher"}
    m = build_method("mixed", params)
    q = m.quantize(copy.deepcopy(tiny), calib)
    plan = {n: (b, m.artifacts["group_sizes"][n]) for n, b in m.artifacts["allocation"].items()}
    assert len(set(plan.values())) > 1
    ref = build_method(inner, {"act_order": False} if inner == "gptq" else {})
    r = ref.quantize(copy.deepcopy(tiny), calib, plan=plan)
    sd, sd_ref = q.state_dict(), r.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)


def test_config_errors(tiny, calib):
    with pytest.raises(ConfigError, match="bits_choices"):
        build_method("mixed", {"bits_choices": [2, 5]})
    with pytest.raises(ConfigError, match="inner"):
        build_method("mixed", {"inner": "awq"})
    with pytest.raises(ConfigError, match="cheapest"):
        build_method("mixed", {"target_bpw": 1.0}).quantize(copy.deepcopy(tiny), calib)


# --------------------------------------------------------------------------- (bits, group size) choices


def test_module_bytes_equal_real_quantized_bytes_for_every_group():
    from quantbench.methods.qlinear import IntQuantLinear
    from quantbench.methods.rtn import rtn_quantize_weight

    lin = torch.nn.Linear(576, 192, bias=False)  # 576: 128 and 256 do not divide it (a shorter last group)
    for b in (2, 3, 4, 8):
        for g in (64, 128, 256, -1):
            codes, scales, zeros = rtn_quantize_weight(lin.weight.data, b, g, False)
            real = IntQuantLinear.from_codes(codes, scales, zeros, b, g).storage().total
            assert module_bytes(lin, b, g) == real
    # coarser groups are cheaper, the per-channel 3-bit module costs barely more than 3 bits/weight
    assert module_bytes(lin, 3, 64) > module_bytes(lin, 3, 128) > module_bytes(lin, 3, 256) > module_bytes(lin, 3, -1)
    assert 8 * module_bytes(lin, 3, -1) / lin.weight.numel() < 3.05


def test_exact_tiny_case_with_group_choices():
    # 2 items x (bits, group) choices; the optimum needs a coarse group on one item and a fine one on the other
    costs = np.array([[10.0, 8.0, 6.0], [10.0, 8.0, 6.0]])
    values = np.array([[0.0, 1.0, 9.0], [0.0, 5.0, 6.0]])
    picks, total = solve_mckp(costs, values, 16.0, unit=1)
    assert picks == [1, 1] and total == pytest.approx(6.0)
    picks, total = solve_mckp(costs, values, 14.0, unit=1)
    assert picks == [1, 2] and total == pytest.approx(7.0)


@pytest.mark.parametrize("metric", ["fisher", "fisher-kl"])
def test_group_choices_respect_budget_and_are_recorded(tiny, calib, metric):
    params = {"target_bpw": 3.0, "group_choices": [64, 128, 256, -1], "sensitivity": metric}
    m = build_method("mixed", params)
    q = m.quantize(copy.deepcopy(tiny), calib)
    bpw = _bpw(q)
    assert bpw <= 3.0
    assert bpw == pytest.approx(m.artifacts["achieved_bpw"])
    groups = m.artifacts["group_sizes"]
    assert len(groups) == 14 and set(groups.values()) <= {64, 128, 256, -1}
    for name, g in groups.items():
        mod = q.get_submodule(name)
        assert mod.bits == m.artifacts["allocation"][name]
        assert mod.group_size == (mod.in_features if g == -1 else g)
    assert sum(m.artifacts["group_histogram"].values()) == 14
    assert sum(m.artifacts["choice_histogram"].values()) == 14
    assert torch.isfinite(q(torch.randint(0, 256, (1, 16))).logits).all()


def test_group_choices_no_worse_predicted_than_single_group(tiny, calib):
    preds = {}
    for groups in ([128], [64, 128, 256, -1]):
        m = build_method("mixed", {"target_bpw": 3.0, "group_choices": groups, "sensitivity": "fisher-kl"})
        m.quantize(copy.deepcopy(tiny), calib)
        preds[len(groups)] = m.artifacts["predicted_total_sensitivity"]
    assert preds[4] <= preds[1] + 1e-12  # a superset of choices cannot do worse on the model it optimises


def test_fisher_kl_tracks_measured_kl(tiny, calib):
    from quantbench.methods.sensitivity import measure_choice_sensitivities

    model = copy.deepcopy(tiny)
    rows = [
        {"name": n, "layer": int(n.split(".")[2]), "projection": n.rsplit(".", 1)[-1], "kind": "linear"}
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    choices = [(2, 64), (3, 128), (4, -1)]
    est = measure_choice_sensitivities(model, calib.tokens, choices, rows, "fisher-kl")
    kl = measure_choice_sensitivities(model, calib.tokens, choices, rows, "kl")
    e = np.array([est[g][b][r["name"]]["kl"] for b, g in choices for r in rows])
    k = np.array([kl[g][b][r["name"]]["kl"] for b, g in choices for r in rows])
    assert (e > 0).all()
    # same scale (a second-order estimate of the same KL) and strongly rank-correlated
    assert 0.2 < e.sum() / k.sum() < 5
    rank = np.corrcoef(np.argsort(np.argsort(e)), np.argsort(np.argsort(k)))[0, 1]
    assert rank > 0.8
    # the model is left as it was (no grads, weights untouched)
    for (_, p), (_, p0) in zip(model.named_parameters(), tiny.named_parameters()):
        assert torch.equal(p, p0) and p.grad is None and p.requires_grad == p0.requires_grad


def test_fisher_kl_at_a_base_choice(tiny, calib):
    from quantbench.methods.sensitivity import measure_choice_sensitivities

    model = copy.deepcopy(tiny)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    rows = [{"name": n, "layer": int(n.split(".")[2]), "projection": "", "kind": "linear"} for n in names]
    choices = [(2, 64), (3, 128), (4, 128)]
    est = measure_choice_sensitivities(model, calib.tokens, choices, rows, "fisher-kl", base=(3, 128), positions=16)
    tot = {c: sum(est[c[1]][c[0]][n]["kl"] for n in names) for c in choices}
    assert all(est[g][b][n]["kl"] >= 0 for b, g in choices for n in names)
    assert tot[2, 64] > tot[3, 128] > tot[4, 128] > 0
    iso = measure_choice_sensitivities(model, calib.tokens, choices, rows, "fisher-kl", positions=16)
    assert sum(iso[128][3][n]["kl"] for n in names) != pytest.approx(tot[3, 128])  # a different cache entry
    for (_, p), (_, p0) in zip(model.named_parameters(), tiny.named_parameters()):
        assert torch.equal(p, p0) and p.grad is None
    m = build_method(
        "mixed",
        {
            "target_bpw": 3.0,
            "group_choices": [64, 128, -1],
            "sensitivity": "fisher-kl",
            "base_choice": [3, 128],
            "positions": 16,
        },
    )
    q = m.quantize(copy.deepcopy(tiny), calib)
    assert _bpw(q) <= 3.0
    with pytest.raises(ConfigError, match="base_choice"):
        build_method("mixed", {"base_choice": [3, 128]})  # needs fisher-kl


# --------------------------------------------------------------------------- replicates, spread, GPTQ-aware scoring


def _linear_rows(model):
    return [
        {"name": n, "layer": int(n.split(".")[2]), "projection": n.rsplit(".", 1)[-1], "kind": "linear"}
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]


def test_fisher_kl_averages_label_seeds_and_records_spread(tiny, calib):
    from quantbench.methods import sensitivity as S

    model = copy.deepcopy(tiny)
    rows = _linear_rows(model)
    choices = [(2, 64), (3, 128)]
    win = calib.tokens[:1]
    avg = S.measure_choice_sensitivities(model, win, choices, rows, "fisher-kl", seeds=3)
    # each replicate alone: the same window with label seed 0, 1, 2
    single = []
    for s in range(3):
        docs = {c: {"values": {}} for c in choices}
        paths = {c: calib_path for c, calib_path in zip(choices, [S.cache_path(f"t{s}a"), S.cache_path(f"t{s}b")])}
        S._measure_fisher_kl(model, win, [(c, r) for c in choices for r in rows], S.rtn_fake_quantize, docs, paths,
                             seed=s)
        single.append(docs)
    for b, g in choices:
        for r in rows:
            reps = torch.tensor([d[b, g]["values"][r["name"]]["kl"] for d in single], dtype=torch.float64)
            v = avg[g][b][r["name"]]
            assert v["replicates"] == 3
            assert v["kl"] == pytest.approx(float(reps.mean()), rel=1e-9)
            assert v["kl_std"] == pytest.approx(float(reps.std()), rel=1e-9)
    assert any(avg[64][2][r["name"]]["kl_std"] > 0 for r in rows)  # the seeds do draw different labels
    # the seed count is in the cache key: one seed is another entry, with no spread
    one = S.measure_choice_sensitivities(model, win, choices, rows, "fisher-kl")
    assert all(one[64][2][r["name"]]["kl_std"] == 0 for r in rows)
    assert one[64][2][rows[0]["name"]]["kl"] == pytest.approx(single[0][2, 64]["values"][rows[0]["name"]]["kl"])


def test_fisher_kl_chunked_replicates_equal_unchunked(tiny, calib, monkeypatch):
    from quantbench.methods import sensitivity as S

    model = copy.deepcopy(tiny)
    rows = _linear_rows(model)
    choices = [(2, 64), (4, -1)]
    full = S.measure_choice_sensitivities(model, calib.tokens, choices, rows, "fisher-kl", seeds=2, use_cache=False)
    monkeypatch.setattr(S, "STORE_BYTES", 1)  # one replicate per chunk
    chunked = S.measure_choice_sensitivities(model, calib.tokens, choices, rows, "fisher-kl", seeds=2,
                                             use_cache=False)
    for b, g in choices:
        for r in rows:
            assert chunked[g][b][r["name"]]["kl"] == pytest.approx(full[g][b][r["name"]]["kl"], rel=1e-9)
            assert full[g][b][r["name"]]["replicates"] == 4


def test_gptq_inner_scores_with_gptq(tiny, calib, monkeypatch):
    from quantbench.methods import sensitivity as S

    calls = []
    orig = S.gptq_quantize

    def spy(w, H, bits, gs, **kw):
        calls.append((tuple(w.shape), bits, gs, kw["act_order"]))
        return orig(w, H, bits, gs, **kw)

    monkeypatch.setattr(S, "gptq_quantize", spy)
    params = {"target_bpw": 3.0, "group_choices": [64, -1], "bits_choices": [2, 3], "sensitivity": "fisher-kl",
              "calib_windows": 2, "label_seeds": 2}
    m = build_method("mixed", {**params, "inner": "gptq"})
    q = m.quantize(copy.deepcopy(tiny), calib)
    # every (module, choice) scored once on the weight GPTQ gives that module (act_order off, as the inner GPTQ)
    assert len(calls) == 14 * 4 and {c[3] for c in calls} == {False}
    assert m.artifacts["sensitivity_quantizer"].startswith("gptq(") and m.artifacts["sensitivity_replicates"] == 4
    spread = m.artifacts["sensitivity_spread"]
    assert set(spread["per_module"]) == set(m.artifacts["allocation"])
    assert all(v["kl_std"] is not None and v["kl_std"] >= 0 for v in spread["per_module"].values())
    assert 0 < spread["median_rel_std"] <= spread["max_rel_std"]
    assert _bpw(q) <= 3.0
    # GPTQ lowers each layer's output error: the GPTQ-scored total at 2 bits is below the RTN-scored one
    r = build_method("mixed", {**params, "inner": "rtn"})
    r.quantize(copy.deepcopy(tiny), calib)
    assert r.artifacts["sensitivity_quantizer"] == "rtn"
    for k in ("2/g64", "2/g-1"):
        assert m.artifacts["uniform_sensitivity"][k] < r.artifacts["uniform_sensitivity"][k]
