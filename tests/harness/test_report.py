"""Leaderboards: Markdown with Δ/recovery vs fp per protocol column, the self-contained HTML page, plots."""

import json
import re
from html.parser import HTMLParser

import pytest

from quantbench.harness.report import publish
from quantbench.harness.report.leaderboard import leaderboard, markdown, vs_fp, write_report
from quantbench.harness.report.publish import kv_bits, loss_curves, pareto_front, render_extras
from quantbench.harness.run.records import RecordWriter

from .fake_records import PPL_PROTO, cell, rec

PPL128 = dict(PPL_PROTO, seq_len=128)


def _records():
    recs = []
    for name, method, ppl, ppl128, acc, bits, wb, dec in [
        ("fp", "fp", 20.0, 18.0, 0.60, 16.0, 2.0e6, 5.0),
        ("rtn-w4", "rtn", 22.5, 19.0, 0.54, 4.5, 0.6e6, 2.0),
        ("gptq-w4", "gptq", 21.0, 18.5, 0.59, 4.5, 0.6e6, 2.1),
        ("rtn-w3", "rtn", 30.0, None, 0.45, 3.5, 0.5e6, None),
    ]:
        recs += cell(name, {"perplexity": ppl, "accuracy": acc, "bits_per_weight": bits, "weight_bytes": wb},
                     method=method)
        if ppl128 is not None:
            recs.append(rec(name, "perplexity", ppl128, method=method, protocol=PPL128))
        if dec is not None:
            recs.append(rec(name, "decode_ms_per_token", dec, method=method))
    kv_cfg = [{"method": "gptq", "bits": 4}, {"method": "kivi", "bits": 2}]
    recs += cell("gptq+kivi2", {"perplexity": 23.0, "bits_per_weight": 4.5}, method="gptq+kivi", config=kv_cfg)
    recs.append(rec("gptq+kivi2", "kv_bytes_per_token", 100.0, method="gptq+kivi", config=kv_cfg,
                    protocol={"kv_bits": 2.25}))
    recs.append(rec("broken", "perplexity", None, method="rtn", status="failed", error="RuntimeError: nan"))
    recs += cell("fp", {"perplexity": 40.0, "bits_per_weight": 32.0}, model="tiny-opt", method="fp")
    recs += cell("rtn-w4", {"perplexity": 44.0, "bits_per_weight": 4.5}, model="tiny-opt", method="rtn")
    return recs


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    RecordWriter(d / "records.jsonl").write_cell(_records())
    (d / "env.json").write_text(json.dumps({"git_sha": "0123456789abcdef", "dirty": True,
                                            "versions": {"torch": "2.13.0+cpu", "quantbench": "0.1.0"},
                                            "hardware": {"cpu": "AMD EPYC", "cores": 2, "gpu": None}, "threads": 2}))
    return d


def test_protocols_never_share_a_column_and_deltas_vs_fp():
    wide = leaderboard(_records())
    cols = list(wide.columns)
    assert "ppl [wiki/gptq/64]" in cols and "ppl [wiki/gptq/128]" in cols and "acc [mmlu/0-shot]" in cols
    wide2, derived = vs_fp(wide)
    assert derived == ["Δppl vs fp [wiki/gptq/64]", "Δppl vs fp [wiki/gptq/128]", "recovery [mmlu/0-shot]"]
    row = wide2[(wide2["model"] == "tiny-llama") & (wide2["cell"] == "rtn-w4")].iloc[0]
    assert row["Δppl vs fp [wiki/gptq/64]"] == pytest.approx(2.5)
    assert row["Δppl vs fp [wiki/gptq/128]"] == pytest.approx(1.0)
    assert row["recovery [mmlu/0-shot]"] == pytest.approx(0.9)
    opt = wide2[(wide2["model"] == "tiny-opt") & (wide2["cell"] == "rtn-w4")].iloc[0]
    assert opt["Δppl vs fp [wiki/gptq/64]"] == pytest.approx(4.0)  # against tiny-opt's own fp row


def test_markdown_sections_and_values():
    md = markdown(_records(), "lb")
    assert md.startswith("# lb\n") and "## t — tiny-llama" in md and "## t — tiny-opt" in md
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| cell |"))
    assert head == ("| cell | ppl [wiki/gptq/64] | Δppl [wiki/gptq/64] | ppl [wiki/gptq/128] | Δppl [wiki/gptq/128] | "
                    "bits/w | weight MB | KV B/tok | decode ms/tok | mmlu | rec | status |")
    line = next(ln for ln in lines if ln.startswith("| gptq-w4 |"))
    assert line == ("| gptq-w4 | 21.00 | +1.000 | 18.50 | +0.500 | 4.500 | 0.600 | — | 2.100 | 0.590 | 0.983 | ok |")
    fp_line = next(ln for ln in lines if ln.startswith("| fp |"))
    assert fp_line.count("| ref |") == 3 and "| 20.00 | ref | 18.00 | ref |" in fp_line
    # the legend under the table: groups with their protocol once, the markers used
    assert "- **quality**: ppl [wiki/gptq/64], Δppl [wiki/gptq/64], ppl [wiki/gptq/128], Δppl [wiki/gptq/128]. " \
           "Protocol: name gptq, dataset wiki, split test, windows 2, tokens 126; ppl [wiki/gptq/64]: seq_len 64; " \
           "ppl [wiki/gptq/128]: seq_len 128." in md
    assert "- **ppl [wiki/gptq/64] (perplexity)**: failed in broken of tiny-llama — RuntimeError: nan" in md


def test_pareto_front():
    pts = [(16.0, 20.0), (4.5, 22.5), (4.5, 21.0), (3.5, 30.0), (8.0, 20.5), (8.0, 25.0), (2.0, 40.0)]
    assert pareto_front(pts) == [6, 3, 2, 4, 0]
    assert pareto_front([]) == []


def test_kv_bits_sources():
    recs = _records()
    kv = [r for r in recs if r["cell"] == "gptq+kivi2"]
    assert kv_bits(kv) == 2.25  # the record's protocol wins
    assert kv_bits([dict(r, protocol={}) for r in kv]) == 2.0  # else the KV method's config
    assert kv_bits([r for r in recs if r["cell"] == "rtn-w4"]) is None  # weight-only cell


class _Table(HTMLParser):
    """Tables of a page: ``head`` the texts of the last header row, ``rows`` the body rows' cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self.in_td, self.in_head, self.scripts, self.external = [], False, False, 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"id": a.get("id"), "head": [], "rows": []})
        elif tag == "thead":
            self.in_head = True
        elif tag == "tr" and self.tables:
            if self.in_head:
                self.tables[-1]["head"] = []
            else:
                self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.in_td = tag
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith(("data:", "#")):
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_td = False
        elif tag == "thead":
            self.in_head = False

    def handle_data(self, data):
        if self.in_td == "th":
            self.tables[-1]["head"].append(data)
        elif self.in_td == "td":
            self.tables[-1]["rows"][-1].append(data)


def test_render_extras_writes_self_contained_html_and_plots(run_dir, tmp_path):
    sens = {"layers": [0, 1, 2], "projections": ["q_proj", "k_proj"], "values": [[0.1, 0.2], [0.3, None], [0.9, 0.4]]}
    (run_dir / "sensitivity.json").write_text(json.dumps(sens))
    qat = run_dir / "cells" / "bitnet-qat" / "bitnet-qat"
    qat.mkdir(parents=True)
    (qat / "loss_curve.json").write_text(json.dumps([[0, 5.0], [10, 3.0], [20, 2.5]]))
    other = run_dir / "cells" / "qat2"
    other.mkdir(parents=True)
    (other / "artifacts.json").write_text(json.dumps({"bitnet-qat": {"loss_curve": {"step": [0, 1], "loss": [4, 3]}}}))
    out = render_extras([run_dir], screenshot=False)
    names = sorted(p.name for p in out["plots"])
    assert names == sorted(f"{s}.{x}" for s in ("pareto_bits_ppl", "latency_memory", "kv_bits_ppl", "sensitivity",
                                                 "qat_loss") for x in ("png", "svg"))
    for p in out["plots"]:
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else b"<svg" in p.read_bytes()[:400]
    assert set(loss_curves([run_dir])) == {"bitnet-qat", "qat2"}
    html = (run_dir / "leaderboard.html").read_text()
    parser = _Table()
    parser.feed(html)
    assert parser.external == []  # self-contained: no network, no sibling files
    assert "<script>" in html and "<style>" in html and html.count("data:image/png;base64,") == 5
    llama, opt, kv70b = parser.tables  # the two leaderboards, then the KV calculator table (a kivi cell)
    assert [r[0] for r in kv70b["rows"]] == ["fp16 cache", "gptq+kivi2"]
    assert [r[0] for r in llama["rows"]] == ["fp", "rtn-w4", "gptq-w4", "rtn-w3", "gptq+kivi2", "broken"]
    assert [r[0] for r in opt["rows"]] == ["fp", "rtn-w4"]
    assert "rec" in llama["head"] and "Δppl [wiki/gptq/128]" in llama["head"]
    assert "mmlu" not in opt["head"]  # a model's section shows only its measured columns
    gptq = dict(zip(llama["head"], llama["rows"][2]))
    assert gptq["ppl [wiki/gptq/64]"] == "21.00" and gptq["rec"] == "0.983" and gptq["method"] == "gptq"
    assert re.search(r'<tr class="groups"><th colspan="2"></th><th colspan="4" class="grp">quality</th>'
                     r'<th colspan="3" class="grp">size</th><th colspan="1" class="grp">speed</th>'
                     r'<th colspan="2" class="grp">tasks</th>', html)
    assert "git <code>0123456789ab</code> (dirty)" in html and "AMD EPYC" in html and "torch 2.13.0+cpu" in html
    assert re.search(r"perplexity</code> \[wiki/gptq/128\]: <code>\{.*&quot;seq_len&quot;: 128", html)


def test_absent_plots_are_skipped_quietly(tmp_path):
    d = tmp_path / "run"
    RecordWriter(d / "records.jsonl").write_cell(cell("fp", {"perplexity": 20.0}, method="fp"))
    out = render_extras([d], tmp_path / "out", screenshot=False)
    assert out["plots"] == [] and (tmp_path / "out" / "leaderboard.html").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["leaderboard.html"]


def test_write_report_merges_runs(run_dir, tmp_path):
    d2 = tmp_path / "run2"
    RecordWriter(d2 / "records.jsonl").write_cell(
        cell("gptq-w3", {"perplexity": 25.0}, method="gptq", run_id="run2", suite="t2"))
    path = write_report([run_dir, d2], tmp_path / "merged")
    md = path.read_text()
    assert "## t — tiny-llama" in md and "## t2 — tiny-llama" in md and "| gptq-w3 | 25.00 |" in md
    html = publish.render_html(publish.load_runs([run_dir, d2]), [run_dir, d2])
    assert html.count("<section") == 3 and "Run <code>run2</code>" in html


def test_method_details_lists_type_histograms_and_allocations(tmp_path):
    from quantbench.harness.report.leaderboard import method_details

    cells = tmp_path / "cells" / "m"
    (cells / "q4km").mkdir(parents=True)
    (cells / "q4km" / "artifacts.json").write_text(json.dumps(
        {"llamacpp": {"type_histogram": {"Q4_K": 16, "Q5_0": 166}, "imatrix": True}}))
    (cells / "mix").mkdir()
    (cells / "mix" / "artifacts.json").write_text(json.dumps(
        {"mixed": {"bits_histogram": {"2": 0, "3": 10, "4": 2}, "target_bpw": 3.0, "achieved_bpw": 2.9969,
                   "sensitivity": "kl"}}))
    recs = [{"cell": "q4km", "model": {"name": "m"}, "metric": "bits_per_weight", "value": 5.534, "status": "ok"}]
    md = method_details([tmp_path], recs)
    assert "- `q4km` (m, 5.534 bits/w): llamacpp with imatrix tensor types Q4_K ×16, Q5_0 ×166" in md
    assert "- `mix` (m): mixed bits 3 ×10, 4 ×2; target 3.0 bpw, achieved 2.9969 (sensitivity: kl)" in md
    assert method_details([tmp_path / "nothing"]) == ""


def test_kv_scaling_rows_reproduce_the_calculator():
    from quantbench.harness.report.leaderboard import kv_scaling_markdown, kv_scaling_rows

    recs = [{"cell": "kvq4", "method": "gptq+kvquant", "method_config": [
        {"method": "gptq", "bits": 4}, {"method": "kvquant", "bits": 4, "outlier_frac": 0.01, "version": 1}]},
        {"cell": "rtn", "method": "rtn", "method_config": {"method": "rtn", "bits": 4}}]
    rows = {r["cell"]: r for r in kv_scaling_rows(recs)}
    assert set(rows) == {"fp16 cache", "kvq4"}
    assert rows["fp16 cache"]["GB"] == pytest.approx(2 * 80 * 8 * 128 * 131072 * 2 / 1e9)  # 42.95 GB
    # 4-bit codes + 1% key outliers and 2 x 5 value outliers per 1024-channel token at 6 B
    # + an fp16 value range per token (2 x 2 B per 1024 channels)
    ref = 4 + (0.01 * 48 + 10 / 1024 * 48) / 2 + 32 / 2048
    assert rows["kvq4"]["bits_per_element"] == pytest.approx(ref, abs=2e-3)
    assert "| fp16 cache | kv-fp16 | 42.95 | 16.000 |" in kv_scaling_markdown(recs)
    assert kv_scaling_rows(recs[1:]) == []


# ------------------------------------------------------------------ hostile names (issue U)
HOSTILE = ["a|b", "<script>alert(1)</script>", "two\nlines", "tick`s", "x & y", "back\\|slash"]
HOSTILE_MODEL = "<img src=x onerror=alert(1)>"


def _md_cells(line):
    """The cells of a Markdown table row as GFM splits it (a backslash escapes the next character)."""
    cells, cur = [], ""
    for tok in re.findall(r"\\.|[^|\\]+|\||\\", line.strip()[1:-1]):
        if tok == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += tok
    return [*cells, cur]


def _hostile_run(tmp_path):
    d = tmp_path / "run"
    recs = cell("fp", {"perplexity": 20.0, "bits_per_weight": 16.0}, method="fp", model=HOSTILE_MODEL,
                suite="s|<b>")
    for name in HOSTILE:
        recs += cell(name, {"perplexity": 21.0, "bits_per_weight": 4.5}, method="rtn", model=HOSTILE_MODEL,
                     suite="s|<b>")
    recs.append(rec("<i>kv|", "kv_bytes_per_token", 10.0, method="gptq+kivi", model=HOSTILE_MODEL, suite="s|<b>",
                    config=[{"method": "gptq", "bits": 4}, {"method": "kivi", "bits": 2}]))
    recs.append(rec("tick`s", "top1_agreement", None, method="rtn", status="failed", model=HOSTILE_MODEL,
                    suite="s|<b>", error="ValueError: <bad> | `x`\nline 2"))
    RecordWriter(d / "records.jsonl").write_cell(recs)
    (d / "env.json").write_text(json.dumps({"git_sha": "<sha>", "versions": {"torch": "2|<t>"},
                                            "hardware": {"cpu": "<script>cpu</script>", "gpu": None}, "threads": 1}))
    arts = d / "cells" / "m" / "<img src=y onerror=alert(2)>|"
    arts.mkdir(parents=True)
    (arts / "artifacts.json").write_text(json.dumps({"llamacpp": {"type_histogram": {"<Q4>": 1}}}))
    return d


def test_markdown_leaderboard_escapes_every_text_cell(tmp_path):
    d = _hostile_run(tmp_path)
    md = write_report([d]).read_text()
    outside_code = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", md)  # a code span shows its text literally
    for raw in ("<script", "<img", "<b>", "<i>", "<bad>", "<sha>", "<t>", "<Q4>"):
        assert raw not in outside_code, raw  # no HTML passes through
    assert "- `<img src=y onerror=alert(2)>|` (m): llamacpp tensor types &lt;Q4&gt; ×1" in md
    tables: list[list[list[str]]] = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")
            if not in_table:
                tables.append([])
            in_table = True
            if not line.startswith("|---"):
                tables[-1].append(_md_cells(line))
        else:
            in_table = False
            # no torn-off cell text
            assert not line.strip() or line.startswith(("#", "- ", "L=", "Run ", "Baseline: ")), line
    assert len(tables) == 2
    for t in tables:  # every row keeps its table's column count
        assert {len(r) for r in t} == {len(t[0])}
    assert [c[0].strip() for c in tables[0][1:]] == [
        "fp", "a\\|b", "&lt;script&gt;alert(1)&lt;/script&gt;", "two lines", "tick\\`s", "x &amp; y",
        "back\\\\\\|slash", "&lt;i&gt;kv\\|"]
    assert "## s\\|&lt;b&gt; — &lt;img src=x onerror=alert(1)&gt;" in md
    assert "- **top-1 [wiki/gptq/64] (top1_agreement)**: failed in tick\\`s of &lt;img src=x onerror=alert(1)&gt; " \
           "— ValueError: &lt;bad&gt; \\| \\`x\\` line 2" in md
    assert "Run `run`: git &lt;sha&gt;" in md and "&lt;script&gt;cpu&lt;/script&gt;" in md


def test_html_leaderboard_escapes_every_name(tmp_path):
    d = _hostile_run(tmp_path)
    render_extras([d], screenshot=False)
    page = (d / "leaderboard.html").read_text()

    class _Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text.append(data)

    p = _Tags()
    p.feed(page)
    assert [t for t, _ in p.tags if t in ("script", "b", "i")] == ["script"]  # only the page's sorter/filter
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in p.tags if t == "img")  # only the plots
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    text = "".join(p.text)
    for name in [*HOSTILE, HOSTILE_MODEL, "<i>kv|", "<script>cpu</script>", "ValueError: <bad> | `x`\nline 2",
                 "<img src=y onerror=alert(2)>|", "<Q4>"]:
        assert name in text, name  # shown literally
    tables = _Table()
    tables.feed(page)
    lb = tables.tables[0]
    assert [r[0] for r in lb["rows"]] == ["fp", *HOSTILE, "<i>kv|"]


def test_alpha_sweep_table_and_plot(tmp_path):
    """The sweep's rows come from the cells' artifacts (median over layers) and the records' perplexity."""
    d = tmp_path / "run"
    recs = [rec("fp", "perplexity", 15.0, method="fp"), rec("w8a8", "perplexity", 16.2, method="w8a8"),
            rec("llm-int8", "perplexity", 15.7, method="llm-int8")]
    outl = {0.0: ([40.0, 50.0, 60.0], [1.0, 1.0, 1.0]), 0.5: ([6.0, 7.0, 9.0], [5.0, 6.0, 8.0]),
            1.0: ([1.0, 1.0, 1.0], [30.0, 45.0, 50.0])}
    for a, (acts, ws) in outl.items():
        name = f"smoothquant-a{a:g}"
        recs.append(rec(name, "perplexity", 16.0 - a, method="smoothquant"))
        rows = [{"layer": i, "group": "qkv", "before": 50.0, "after": x, "w_before": 3.0, "w_after": w}
                for i, (x, w) in enumerate(zip(acts, ws))]
        art = d / "cells" / "tiny-llama" / name / "artifacts.json"
        art.parent.mkdir(parents=True)
        art.write_text(json.dumps({"smoothquant": {"alpha": a, "outliers": rows}}))
    RecordWriter(d / "records.jsonl").write_cell(recs)
    rows = publish.alpha_sweep_rows([d], recs)
    by = {r["alpha"]: r for r in rows}
    assert by[0.0]["act_qkv"] == 50.0 and by[0.0]["w_qkv"] == 1.0 and by[0.0]["perplexity"] == 16.0
    assert by[1.0]["act_qkv"] == 1.0 and by[1.0]["w_qkv"] == 45.0 and by[0.5]["act_qkv"] == 7.0
    paths = publish.plot_alpha_sweep([d], recs, tmp_path / "out")
    assert {p.name for p in paths} == {"alpha_sweep.png", "alpha_sweep.svg"}
    table = (tmp_path / "out" / "alpha_sweep.csv").read_text().splitlines()
    assert table[0].startswith("model,cell,method,alpha,perplexity") and len(table) == 4
