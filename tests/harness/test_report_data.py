"""The report's numbers: uncertainty (paired against the baseline where the records allow it), compact
notation, the baseline's real precision, the source-grid mark, noisy and unavailable records, the weight
bytes split, the tidy/wide data files (CSV, parquet, JSON) and the plots' axes."""

import json
import math
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest

from quantbench.harness.cli import main
from quantbench.harness.report.leaderboard import (
    board,
    compact,
    holds_source_grid,
    markdown,
    paired_recovery,
    tidy_table,
    wide_table,
)
from quantbench.harness.report.publish import kv_bits_per_element, place_labels, plot_bits_ppl, plot_kv_bits_ppl
from quantbench.harness.run.records import RecordWriter

from .fake_records import PAIRED_METRICS, cell, paired_cell, rec

SRC = {"source_precision": "GGUF Q4_1", "dtype": "float32"}
FP_CFG = {"method": "fp", "dtype": "float32", "version": 1}
RNG = np.random.default_rng(0)
FP_SAMPLES = [float(x) for x in (RNG.random(200) < 0.6)]
# a quantized model that gets 12 of the fp model's right answers wrong and 2 wrong ones right
Q_SAMPLES = list(FP_SAMPLES)
_right = [i for i, x in enumerate(FP_SAMPLES) if x == 1.0][:12]
_wrong = [i for i, x in enumerate(FP_SAMPLES) if x == 0.0][:2]
for i in _right:
    Q_SAMPLES[i] = 0.0
for i in _wrong:
    Q_SAMPLES[i] = 1.0


def _recs():
    kw = {"model_info": SRC}
    recs = paired_cell("fp", 15.0, 0.7, 0.0, 0.0, FP_SAMPLES, method="fp", config=FP_CFG, **kw)
    # small difference, tight paired error: beyond 2 stderr paired, hidden by the independent errors
    recs += paired_cell("rtn-w8", 15.06, 0.7, math.log(15.06 / 15.0), 0.001, Q_SAMPLES, method="rtn",
                        config={"method": "rtn", "bits": 8, "group_size": -1, "sym": False}, **kw)
    recs += [rec("rtn-w4g32", "perplexity", 15.3, stderr=0.72, method="rtn", **kw,
                 config={"method": "rtn", "bits": 4, "group_size": 32, "sym": False})]
    recs += [rec("gptq-w4g128", "perplexity", 1.2772e8, stderr=1e7, method="gptq", **kw,
                 config={"method": "gptq", "bits": 4, "group_size": 128, "sym": False, "act_order": True})]
    for c, m in (("fp", "fp"), ("rtn-w8", "rtn")):
        recs.append(rec(c, "energy_j_per_token", None, method=m, status="unavailable", error="no RAPL", **kw,
                        config=FP_CFG if m == "fp" else None))
    return recs


def _section():
    (sec,) = board(_recs())
    return sec


def test_compact_notation():
    assert [compact(v) for v in (1.2772e8, 74398.6, 46080.0, 538.06, 15.576, 0.4023, 8.9e-5)] == [
        "1.28e8", "74.4k", "46.1k", "538.1", "15.58", "0.402", "8.9e-05"]
    assert compact(None) == "—" and compact(-2.5e6) == "-2.50e6"


def test_delta_ppl_is_paired_from_ln_ppl_ratio_and_falls_back_to_independent_errors():
    sec = _section()
    rows = {r.cell: r for r in sec.rows}
    d = rows["rtn-w8"].values["delta [wiki/gptq/64]"]
    assert d.value == pytest.approx(0.06) and d.paired
    assert d.stderr == pytest.approx(15.06 * 0.001)  # delta method: d ppl = ppl x d ln ppl
    assert d.tone == "bad" and d.text == "+0.060 ± 0.015"  # 0.06 > 2 x 0.015: a real, small, loss
    d4 = rows["rtn-w4g32"].values["delta [wiki/gptq/64]"]
    assert not d4.paired and d4.stderr == pytest.approx(math.hypot(0.72, 0.7)) and d4.tone == ""
    assert d4.text == "+0.300 ± 1.004†"  # independent errors, labelled
    assert rows["gptq-w4g128"].values["perplexity [wiki/gptq/64]"].text == "1.28e8 ± 1.00e7"


def test_recovery_is_paired_over_the_examples():
    f = rec("fp", "accuracy", float(np.mean(FP_SAMPLES)), samples=FP_SAMPLES)
    q = rec("q", "accuracy", float(np.mean(Q_SAMPLES)), samples=Q_SAMPLES)
    r, se, paired = paired_recovery(q, f)
    qa, fa = np.array(Q_SAMPLES), np.array(FP_SAMPLES)
    n = len(qa)
    cov = np.cov(np.stack([qa, fa]), ddof=1) / n  # covariance of the two means
    ratio = qa.mean() / fa.mean()
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / fa.mean() ** 2  # delta method of a ratio
    assert paired and r == pytest.approx(ratio) and se == pytest.approx(math.sqrt(var), rel=1e-9)
    # independent errors: much wider than the paired one (most examples agree)
    f2, q2 = dict(f, samples=None, stderr=fa.std(ddof=1) / math.sqrt(n)), dict(q, samples=None,
                                                                             stderr=qa.std(ddof=1) / math.sqrt(n))
    r2, se2, paired2 = paired_recovery(q2, f2)
    assert not paired2 and r2 == pytest.approx(ratio) and se2 > 2 * se
    assert se2 == pytest.approx(ratio * math.hypot(q2["stderr"] / qa.mean(), f2["stderr"] / fa.mean()))
    sec = _section()
    v = {r.cell: r for r in sec.rows}["rtn-w8"].values["recovery [mmlu/0-shot]"]
    assert v.paired and v.value == pytest.approx(ratio) and v.tone == "bad"  # 10 net losses of 200: beyond 2 se


def test_baseline_label_source_grid_and_legend():
    sec = _section()
    assert sec.baseline_label == "fp32 (dequantized from GGUF Q4_1)"
    rows = {r.cell: r for r in sec.rows}
    assert rows["fp"].label == "fp32 (dequantized from GGUF Q4_1)" and rows["rtn-w8"].label == "rtn-w8"
    assert rows["rtn-w4g32"].marks == "§" and rows["rtn-w8"].marks == "" and rows["gptq-w4g128"].marks == ""
    md = markdown(_recs())
    assert "| fp32 (dequantized from GGUF Q4_1) |" in md and "| rtn-w4g32§ |" in md
    assert "- **§**: the cell's weight grid contains the source's GGUF Q4_1 grid" in md
    # unavailable: one line for its reason, not one per cell, and no empty column
    assert md.count("no RAPL") == 1 and "J/tok" not in md.split("### Not measured")[0]
    assert "- **J/tok (energy_j_per_token)**: unavailable in every cell (2) of tiny-llama — no RAPL" not in md
    assert "- **J/tok (energy_j_per_token)**: unavailable in fp, rtn-w8 of tiny-llama — no RAPL" in md


@pytest.mark.parametrize("cfg, src, holds", [
    ({"method": "rtn", "bits": 4, "group_size": 32, "sym": False}, "GGUF Q4_1", True),
    ({"method": "rtn", "bits": 8, "group_size": 32, "sym": False}, "GGUF Q4_1", True),  # 255 = 17 x 15 levels
    ({"method": "rtn", "bits": 4, "group_size": 128, "sym": False}, "GGUF Q4_1", False),  # one scale, 4 blocks
    ({"method": "rtn", "bits": 4, "group_size": 32, "sym": True}, "GGUF Q4_1", False),  # no zero point
    ({"method": "rtn", "bits": 3, "group_size": 32, "sym": False}, "GGUF Q4_1", False),
    ({"method": "gptq", "bits": 4, "group_size": 32, "sym": False, "act_order": True}, "GGUF Q4_1", False),
    ({"method": "gptq", "bits": 4, "group_size": 32, "sym": False, "act_order": True, "static_groups": True},
     "GGUF Q4_1", True),
    ({"method": "rtn", "bits": 4, "group_size": 32, "sym": False}, "bfloat16", False),
])
def test_source_grid_rule(cfg, src, holds):
    assert holds_source_grid({"model": {"source_precision": src}, "method_config": cfg}) is holds


def test_source_grid_rule_matches_the_arithmetic():
    """A Q4_1 block (m + d q, q = 0..15, full range) is reproduced exactly by an asymmetric min/max grid of 32
    columns with 2^b - 1 levels iff 15 divides 2^b - 1 (b = 4, 8), not by a 128-column group."""
    rng = np.random.default_rng(1)
    d, m = rng.uniform(0.01, 0.1, 8), rng.uniform(-1, 0, 8)
    q = rng.integers(0, 16, (8, 32))
    q[:, 0], q[:, 1] = 0, 15
    w = (m[:, None] + d[:, None] * q).reshape(-1)  # 8 source blocks of one row

    def rtn(x, bits, g):
        x = x.reshape(-1, g)
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        s = (hi - lo) / (2**bits - 1)
        return (np.round((x - lo) / s) * s + lo).reshape(-1)

    for bits, g in ((4, 32), (8, 32), (4, 128), (3, 32), (4, 16)):
        exact = np.allclose(rtn(w, bits, g), w, atol=1e-12)
        rule = holds_source_grid({"model": {"source_precision": "GGUF Q4_1"},
                                  "method_config": {"method": "rtn", "bits": bits, "group_size": g, "sym": False}})
        assert exact == rule or (g == 16 and not rule), (bits, g)  # g16: exact only by chance of the data


def test_noisy_marker_latency_range_and_weight_split():
    recs = cell("fp", {"perplexity": 20.0}, method="fp")
    recs.append(rec("fp", "decode_ms_per_token", 10.0, method="fp",
                    protocol={"prompt_len": 8, "context": 8, "batch": 1, "decode_ms_p10": 9.0, "decode_ms_p90": 12.5,
                              "noisy": True, "noisy_reasons": ["load1_before 3.1 > 2 cores"]}))
    recs.append(rec("fp", "weight_bytes", 3e6, method="fp", protocol={"linear_total": 2e6, "other_total": 1e6}))
    recs.append(rec("rtn", "weight_bytes", 1.5e6, method="rtn", protocol={"linear_total": 0.5e6, "other_total": 1e6}))
    md = markdown(recs)
    line = next(ln for ln in md.splitlines() if ln.startswith("| fp |"))
    assert "| ~10.00 (9.000–12.50) |" in line and "| 2.000 | 1.000 |" in line
    assert "| cell | ppl | Δppl | linear MB | other MB | decode ms/tok |" in md
    assert "- **~**: noisy measurement (the record's own flag) in 1 cell(s): fp; reasons: load1_before 3.1 &gt; " \
           "2 cores." in md


def test_reference_path_latency_is_marked():
    recs = cell("fp", {"perplexity": 20.0}, method="fp")
    recs.append(rec("fp", "decode_ms_per_token", 10.0, method="fp", protocol={"reference_path": False}))
    recs += cell("mxfp4", {"perplexity": 25.0}, method="mxfp4")
    recs.append(rec("mxfp4", "decode_ms_per_token", 300.0, method="mxfp4",
                    protocol={"reference_path": True, "kernel_paths": {"native": 0, "reference": 14}}))
    md = markdown(recs)
    assert "| ‡300.0 |" in next(ln for ln in md.splitlines() if ln.startswith("| mxfp4 |"))
    assert "‡" not in next(ln for ln in md.splitlines() if ln.startswith("| fp |"))
    assert "in 1 cell(s): mxfp4. Not the format's speed." in md


def test_new_per_token_metrics_render_and_reach_the_data(tmp_path):
    recs = _recs()
    md = markdown(recs)
    assert "| cell | ppl | Δppl | KL p99 | mmlu | rec |" in md  # the table shows KL p99; the data files all of them
    tidy = tidy_table(recs)
    assert set(PAIRED_METRICS) <= set(tidy["metric"])
    wide = wide_table(tidy)
    assert wide.set_index("cell").loc["rtn-w8", "kl_p99"] == pytest.approx(0.03)


def test_tidy_csv_pivots_to_the_wide_table(tmp_path):
    d = tmp_path / "run"
    recs = _recs() + cell("fp", {"perplexity": 30.0}, method="fp", model="other", config=FP_CFG)
    RecordWriter(d / "records.jsonl").write_cell(recs)
    assert main(["report", str(d), "--out", str(tmp_path / "o"), "--format", "csv,json", "--format", "parquet"]) == 0
    tidy = pd.read_csv(tmp_path / "o" / "leaderboard_tidy.csv")
    assert not tidy.duplicated(["suite", "model", "cell", "column"]).any()
    pivot = tidy.pivot(index=["suite", "model", "cell"], columns="column", values="value")  # raises on duplicates
    wide = pd.read_csv(tmp_path / "o" / "leaderboard_wide.csv").set_index(["suite", "model", "cell"])
    assert set(pivot.columns) <= set(wide.columns)
    pd.testing.assert_frame_equal(pivot.sort_index()[sorted(pivot.columns)],
                                  wide.loc[pivot.index].sort_index()[sorted(pivot.columns)], check_names=False)
    row = tidy[(tidy.cell == "rtn-w8") & (tidy.metric == "recovery_vs_baseline")].iloc[0]
    assert row.stderr_kind == "paired" and row.task == "mmlu" and row.column == "recovery_vs_baseline/mmlu"
    dp = tidy[(tidy.cell == "rtn-w4g32") & (tidy.metric == "delta_ppl_vs_baseline")].iloc[0]
    assert dp.stderr_kind == "independent" and dp.value == pytest.approx(0.3)
    ppl = tidy[(tidy.cell == "fp") & (tidy.metric == "perplexity") & (tidy.model == "tiny-llama")].iloc[0]
    assert ppl["proto.seq_len"] == 64 and ppl.label == "fp32 (dequantized from GGUF Q4_1)" and ppl.unit == "ppl"
    pq = pd.read_parquet(tmp_path / "o" / "leaderboard_tidy.parquet")
    assert len(pq) == len(tidy) and list(pq.columns) == list(tidy.columns)
    js = json.loads((tmp_path / "o" / "leaderboard_wide.json").read_text())
    assert {r["cell"] for r in js} == {"fp", "rtn-w8", "rtn-w4g32", "gptq-w4g128"}
    assert not (tmp_path / "o" / "leaderboard.md").exists()  # only the formats asked for


def test_report_format_errors(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    RecordWriter(d / "records.jsonl").write_cell(_recs())
    assert main(["report", str(d), "--format", "xlsx"]) == 2
    assert "unknown format 'xlsx'" in capsys.readouterr().err
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    assert main(["report", str(d), "--format", "all"]) == 2
    assert "parquet output needs pyarrow" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["records.jsonl"]  # nothing written


def _svg_text(path):
    return re.sub(r"\s+", " ", path.read_text())


def test_plots_separate_families_cap_the_axis_and_use_kv_bits(tmp_path):
    recs = _recs()
    recs += [rec("w8a8", "perplexity", 15.4, stderr=0.7, method="w8a8", config={"method": "w8a8"})]
    for c, b in (("fp", 32.0), ("rtn-w8", 8.03), ("rtn-w4g32", 4.5), ("gptq-w4g128", 4.2), ("w8a8", 8.05)):
        recs.append(rec(c, "bits_per_weight", b, method=c.split("-")[0], config=FP_CFG if c == "fp" else None,
                        model_info=SRC))
    kv_cfg = {"method": "kv-uniform", "bits": 2, "group_size": -1}
    recs += [rec("kv-uniform-2", "perplexity", 900.0, stderr=90.0, method="kv-uniform", config=kv_cfg),
             rec("kv-uniform-2", "kv_bytes_per_token", 3600.0, method="kv-uniform", config=kv_cfg),
             rec("fp", "kv_bytes_per_token", 46080.0, method="fp", config=FP_CFG, model_info=SRC)]
    assert kv_bits_per_element(recs)[("tiny-llama", "kv-uniform-2")] == pytest.approx(8 * 3600 / (46080 / 4))
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to read it back
        paths = plot_bits_ppl(recs, tmp_path) + plot_kv_bits_ppl(recs, tmp_path)
    svg = _svg_text(tmp_path / "pareto_bits_ppl.svg")
    assert "weight-only methods" in svg and "weights + activations methods" in svg and "KV-cache" not in svg
    assert "gptq-w4g128 (ppl 1.28e8)" in svg  # off scale: at the edge, its value in the key
    assert "fp32 (dequantized from GGUF Q4_1): 15.00" in svg
    kv = _svg_text(tmp_path / "kv_bits_ppl.svg")
    assert "kv-uniform-2 (ppl 900.0)" in kv and "cache 32 bits" in kv and "KV-cache bits / element" in kv
    assert len(paths) == 4


def test_place_labels_do_not_overlap():
    plt = matplotlib.pyplot
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    pts = [(1.0, 1.0), (1.01, 1.0), (1.0, 1.01), (1.02, 1.02), (2.0, 2.0)]
    ax.scatter(*zip(*pts))
    ax.set_xlim(0, 3)
    ax.set_ylim(0, 3)
    place_labels(ax, pts, ["1", "2", "3", "4", "5"])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 5
    for i in range(5):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (i, j)
    plt.close(fig)


@pytest.mark.parametrize("model_dtype, fp_dtype, src, want", [
    ("bfloat16", "float32", "bfloat16", "bf16"),  # --dtype bfloat16: fp's default leaves the model in bf16
    ("float32", "float32", "bfloat16", "fp32 (converted from bf16)"),  # loaded in float32 from a bf16 checkpoint
    ("float32", "bfloat16", "bfloat16", "bf16"),  # fp with dtype bfloat16 casts
    ("float32", "float32", "GGUF Q4_1", "fp32 (dequantized from GGUF Q4_1)"),
])
def test_baseline_label_names_the_dtype_the_row_ran_in(model_dtype, fp_dtype, src, want):
    from quantbench.harness.report.leaderboard import baseline_label

    rec = {"cell": "fp", "model": {"dtype": model_dtype, "source_precision": src},
           "method_config": {"method": "fp", "dtype": fp_dtype}}
    assert baseline_label(rec) == want
