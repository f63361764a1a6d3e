"""Sensitivity analysis: exact restore, block-suffix == full forward, 8 < 2 bits, disk cache, map document."""

import json

import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.harness.tools.sensitivity import cmd_sensitivity, write_heatmap
from quantbench.methods import sensitivity as S
from quantbench.methods.base import model_fingerprint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_llama().model


@pytest.fixture
def windows():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def test_rtn_fake_quantize_matches_intquantlinear():
    from quantbench.methods.qlinear import IntQuantLinear
    from quantbench.methods.rtn import rtn_quantize_weight

    w = torch.randn(64, 256)
    for bits in (2, 3, 4, 8):
        codes, s, z = rtn_quantize_weight(w, bits, 128, False)
        q = IntQuantLinear.from_codes(codes, s, z, bits, 128)
        assert torch.equal(S.rtn_fake_quantize(w, bits, 128), q.dequantized_weight())


def test_single_module_swap_restores_model_exactly(tiny, windows):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    params_before = {n: p for n, p in tiny.named_parameters()}
    probe = S.SensitivityProbe(tiny, windows)
    for row in S.module_table(tiny):
        w = tiny.get_submodule(row["name"]).weight.data
        res = probe.measure(row, S.rtn_fake_quantize(w, 2, 128))
        assert res["kl"] > 0
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params_before[n] for n, p in tiny.named_parameters())  # the same Parameter objects
    assert tiny.get_input_embeddings().weight is tiny.get_output_embeddings().weight  # still tied
    assert probe.evaluate()["kl"] == pytest.approx(0.0, abs=1e-7)


def test_block_suffix_evaluation_equals_full_forward(tiny, windows):
    probe = S.SensitivityProbe(tiny, windows)
    assert probe._tail is not None
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        row = next(r for r in S.module_table(tiny) if r["name"] == name)
        qw = S.rtn_fake_quantize(tiny.get_submodule(name).weight.data, 2, 128)
        fast = probe.measure(row, qw)
        with S.swapped_weight(tiny, name, qw):
            full = probe.evaluate(layer=None)
        assert fast["kl"] == pytest.approx(full["kl"], rel=1e-3, abs=1e-8)
        assert fast["nll"] == pytest.approx(full["nll"], rel=1e-5)


@pytest.mark.parametrize("metric", ["kl", "fisher"])
def test_eight_bits_less_sensitive_than_two(tiny, windows, cache, metric):
    res = S.measure_sensitivities(tiny, windows, [2, 8], metric=metric)
    for name in res[2]:
        assert res[8][name]["kl"] < res[2][name]["kl"], name
    total2 = sum(v["kl"] for v in res[2].values())
    total8 = sum(v["kl"] for v in res[8].values())
    assert total8 < 0.01 * total2


def test_fisher_tracks_measured_kl(tiny, windows, cache):
    kl = S.measure_sensitivities(tiny, windows, [2])[2]
    fi = S.measure_sensitivities(tiny, windows, [2], metric="fisher")[2]
    a = torch.tensor([kl[n]["kl"] for n in kl]).log()
    b = torch.tensor([fi[n]["kl"] for n in kl]).log()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.8


def test_results_cached_on_disk_by_key(tiny, windows, cache, monkeypatch):
    first = S.measure_sensitivities(tiny, windows, [3])
    files = list((cache / "sensitivity").glob("*.json"))
    assert len(files) == 1
    # keyed by the weights-only fingerprint (the key the cache has always used; see test_quantize.py)
    assert json.loads(files[0].read_text())["model"] == model_fingerprint(tiny, exact=False)

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(S, "_measure_kl", boom)
    assert S.measure_sensitivities(tiny, windows, [3]) == first
    with pytest.raises(AssertionError):  # other bits, other data: other keys
        S.measure_sensitivities(tiny, windows, [4])
    with pytest.raises(AssertionError):
        S.measure_sensitivities(tiny, windows[:, :40], [3])


def test_map_document_and_heatmap(tiny, windows, cache, tmp_path):
    doc = S.sensitivity_map(tiny, windows, 3)
    assert doc["layers"] == [0, 1]
    assert doc["projections"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(doc["values"]) == 2 and all(len(r) == 7 for r in doc["values"])
    assert doc["embeddings"]["kl"] > 0 and doc["lm_head"]["kl"] > 0
    assert doc["ppl"]["fp"] > 1
    out = tmp_path / "run"
    out.mkdir()
    (out / "sensitivity.json").write_text(json.dumps(doc))
    paths = write_heatmap(doc, out)
    assert all(p.stat().st_size > 1000 for p in paths)
    from quantbench.harness.report.publish import plot_sensitivity

    (tmp_path / "plots").mkdir()
    assert plot_sensitivity([out], tmp_path / "plots")
    s = S.summarize(doc)
    assert set(s["mean_by_projection"]) == set(doc["projections"])


def test_cli_registers_command():
    from quantbench.harness.cli import build_parser

    args = build_parser().parse_args(["sensitivity", "--model", "tiny-llama", "--out", "x", "--bits", "2"])
    assert args.bits == 2 and args.fn is cmd_sensitivity
