"""The HTML leaderboard in a real browser: headless Chromium loads it from disk (file://), the tables render
with the expected rows, a real click on a column header sorts the table (again: reversed), and the
method-family checkboxes and the bits select filter the rows."""

import json
import struct

import pytest

from quantbench.harness.report.browser import Browser, find_chromium, screenshot
from quantbench.harness.report.publish import render_extras
from quantbench.harness.run.records import RecordWriter

from .fake_records import cell

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium installed (apt-get install chromium, or set QUANTBENCH_CHROMIUM); "
           "scripts/ci-system-deps.sh installs it in CI")

ROWS = [  # cell, method, ppl, bits/w
    ("fp", "fp", 20.0, 16.0),
    ("rtn-w8", "rtn", 20.1, 8.25),
    ("rtn-w4", "rtn", 22.5, 4.5),
    ("gptq-w4", "gptq", 21.0, 4.5),
    ("rtn-w3", "rtn", 30.0, 3.5),
    ("rtn-w2", "rtn", None, 2.5),  # not measured: sorts last both ways
    ("w8a8", "w8a8", 20.3, 8.05),  # weights + activations
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("html") / "run"
    recs = []
    for name, method, ppl, bits in ROWS:
        values = {"bits_per_weight": bits} if ppl is None else {"perplexity": ppl, "bits_per_weight": bits}
        recs += cell(name, values, method=method)
    recs += cell("fp", {"perplexity": 40.0, "bits_per_weight": 32.0}, model="tiny-opt", method="fp")
    RecordWriter(d / "records.jsonl").write_cell(recs)
    out = render_extras([d], screenshot=False)
    with Browser() as b:
        b.goto(out["html"][0].resolve().as_uri())
        yield b, d


JS_ROWS = "Array.from(document.querySelectorAll('#lb-0 tbody tr')).map(r => r.cells[0].textContent)"
JS_VISIBLE = ("Array.from(document.querySelectorAll('#lb-0 tbody tr'))"
              ".filter(r => r.getBoundingClientRect().height > 0).map(r => r.cells[0].textContent)")
JS_HEAD = "Array.from(document.querySelectorAll('#lb-0 thead tr:last-child th')).map(h => h.textContent)"


def _sort_by(b, header_text):
    heads = b.evaluate(JS_HEAD)
    col = heads.index(header_text) + 1
    b.click_selector(f"#lb-0 thead tr:last-child th:nth-child({col})")
    return b.evaluate(JS_ROWS), b.evaluate(f"document.querySelector('#lb-0 thead tr:last-child th:nth-child({col})')"
                                            ".getAttribute('aria-sort')")


def test_tables_render_expected_rows(page):
    b, _ = page
    sections = b.evaluate("Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)")
    assert sections == ["t — tiny-llama", "t — tiny-opt"]
    assert b.evaluate(JS_ROWS) == [r[0] for r in ROWS]
    assert b.evaluate(JS_HEAD) == ["cell", "method", "ppl", "Δppl", "bits/w"]
    groups = b.evaluate("Array.from(document.querySelectorAll('#lb-0 thead th.grp'))"
                        ".map(h => [h.textContent, h.colSpan])")
    assert groups == [["quality", 2], ["size", 1]]
    # the table is really laid out (not just in the DOM)
    h = b.evaluate("document.querySelector('#lb-0').getBoundingClientRect().height")
    assert h > 6 * 15
    assert b.evaluate("document.querySelectorAll('#lb-1 tbody tr').length") == 1


def test_click_on_header_sorts(page):
    b, _ = page
    rows, state = _sort_by(b, "ppl")
    assert state == "ascending"
    assert rows == ["fp", "rtn-w8", "w8a8", "gptq-w4", "rtn-w4", "rtn-w3", "rtn-w2"]
    rows, state = _sort_by(b, "ppl")
    assert state == "descending"
    assert rows == ["rtn-w3", "rtn-w4", "gptq-w4", "w8a8", "rtn-w8", "fp", "rtn-w2"]  # missing value still last
    rows, _ = _sort_by(b, "bits/w")
    assert rows[:2] == ["rtn-w2", "rtn-w3"] and rows[-1] == "fp"  # numeric, not lexicographic (16 > 8.25)
    rows, _ = _sort_by(b, "cell")
    assert rows == sorted(r[0] for r in ROWS)
    # the other model's table is untouched
    assert b.evaluate("document.querySelectorAll('#lb-1 thead th[aria-sort]').length") == 0


def test_filters_by_family_and_bits(page):
    b, _ = page
    order = b.evaluate(JS_ROWS)
    assert b.evaluate(JS_VISIBLE) == order
    labels = b.evaluate("Array.from(document.querySelectorAll('form[data-for=lb-0] label')).map(l => l.textContent)")
    assert labels[:3] == [" baseline", " weight-only", " weights + activations"]
    b.click_selector("form[data-for=lb-0] input[value=weight]")  # a real click unticks weight-only
    assert b.evaluate(JS_VISIBLE) == [c for c in order if c in ("fp", "w8a8")]
    assert b.evaluate("document.querySelector('form[data-for=lb-0] .shown').textContent") == "2 of 7 rows"
    b.click_selector("form[data-for=lb-0] input[value=weight]")
    assert b.evaluate(JS_VISIBLE) == order
    options = b.evaluate("Array.from(document.querySelectorAll('form[data-for=lb-0] option')).map(o => o.value)")
    assert options == ["", "2", "3", "4", "8"]  # nominal classes of 2.5, 3.5, 4.5, 8.25 / 8.05 bits/w
    b.evaluate("(() => { const s = document.querySelector('form[data-for=lb-0] select'); s.value = '4';"
               " s.dispatchEvent(new Event('change', {bubbles: true})); })()")
    assert b.evaluate(JS_VISIBLE) == [c for c in order if c not in ("rtn-w8", "w8a8")]  # the baseline stays
    assert b.evaluate("document.querySelectorAll('#lb-1 tbody tr[hidden]').length") == 0  # per table
    b.evaluate("(() => { const s = document.querySelector('form[data-for=lb-0] select'); s.value = '';"
               " s.dispatchEvent(new Event('change', {bubbles: true})); })()")
    assert b.evaluate(JS_VISIBLE) == order


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot_of_the_page(page, tmp_path):
    _, run_dir = page
    png = screenshot(run_dir / "leaderboard.html", tmp_path / "shot.png")
    w, h = _png_size(png)
    assert w == 1280 and h >= 400


def test_render_extras_attaches_screenshot(tmp_path):
    d = tmp_path / "run"
    RecordWriter(d / "records.jsonl").write_cell(cell("fp", {"perplexity": 20.0}, method="fp"))
    (d / "env.json").write_text(json.dumps({"git_sha": "abc"}))
    out = render_extras([d], screenshot=True)
    assert out["screenshot"] == [d / "leaderboard.png"]
    assert _png_size(d / "leaderboard.png")[0] == 1280
