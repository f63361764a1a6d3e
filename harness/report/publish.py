"""Published artefacts of one or more runs: a self-contained leaderboard.html, plots (PNG + SVG) and a
screenshot of the page.

Plots (each skipped quietly when its data is absent):

- ``pareto_bits_ppl``: bits/weight vs perplexity per model and protocol, Pareto frontier marked;
- ``latency_memory``: decode latency (p50 ms/token) vs weight memory;
- ``kv_bits_ppl``: KV-cache bits vs perplexity for cells whose chain quantizes the KV cache;
- ``sensitivity``: a run's ``sensitivity.json`` ({"layers", "projections", "values"}) as a heatmap;
- ``qat_loss``: QAT loss curves (``cells/*/bitnet-qat/loss_curve.json`` or ``"loss_curve"`` in a
  cell's ``artifacts.json``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ...methods.kvcalc import kv_cache_bytes
from . import browser
from .leaderboard import (
    ID_COLUMNS,
    _fmt,
    _fmt_derived,
    kv_scaling_rows,
    latest,
    leaderboard,
    load_runs,
    method_detail_items,
    metric_columns,
    protocol_tag,
    quantizes_kv,
    read_env,
    run_env,
    scaled_metrics,
    vs_fp,
)

log = logging.getLogger(__name__)

PLOT_FORMATS = ("png", "svg")


# --------------------------------------------------------------------------- data helpers
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized),
    ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _chain(rec: dict[str, Any]) -> list[dict[str, Any]]:
    mc = rec.get("method_config")
    if isinstance(mc, list):
        return [c for c in mc if isinstance(c, dict)]
    return [mc] if isinstance(mc, dict) else []


def kv_bits(cell_records: list[dict[str, Any]]) -> float | None:
    """KV-cache bits of a cell: from a record's protocol (``kv_bits``, or ``bits`` of the
    kv_bytes_per_token record), else from the KV method's config, else (no bits parameter: the fp16
    cache) the bits per element of the method's byte formula; None for cells that leave the cache alone."""
    kv_conf = [c for r in cell_records[:1] for c in _chain(r) if quantizes_kv(c.get("method"))]
    if not kv_conf:
        return None
    for r in cell_records:
        p = r.get("protocol") or {}
        if isinstance(p.get("kv_bits"), (int, float)):
            return float(p["kv_bits"])
    for r in cell_records:
        p = r.get("protocol") or {}
        if r["metric"] == "kv_bytes_per_token" and isinstance(p.get("bits"), (int, float)):
            return float(p["bits"])
    c = kv_conf[0]
    for k in ("bits", "kv_bits", "k_bits"):
        if isinstance(c.get(k), (int, float)):
            return float(c[k])
    params = {k: v for k, v in c.items() if k not in ("method", "version")}
    shape = {"n_layers": 1, "n_kv_heads": 1, "head_dim": 128, "tokens": 4096}
    return 8 * kv_cache_bytes(c["method"], params, **shape)["total"] / (2 * 128 * 4096)


def _ok_values(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, str], float]:
    """(model, cell, protocol tag) -> value of the latest ok record of ``metric``."""
    out = {}
    for r in latest(records):
        if r["metric"] == metric and r["status"] == "ok" and r["value"] is not None:
            out[(r["model"]["name"], r["cell"], protocol_tag(r))] = float(r["value"])
    return out


def _by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in latest(records):
        out.setdefault((r["model"]["name"], r["cell"]), []).append(r)
    return out


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib  # deferred: matplotlib is optional

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: matplotlib is optional

    return plt


def _save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in PLOT_FORMATS:
        p = out_dir / f"{stem}.{fmt}"
        fig.savefig(p, format=fmt, dpi=110, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        paths.append(p)
    _plt().close(fig)
    return paths


def _grid(n: int) -> tuple[Any, list[Any]]:
    plt = _plt()
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False, layout="constrained")
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def plot_bits_ppl(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    ppl = _ok_values(records, "perplexity")
    bits = {(m, c): v for (m, c, _), v in _ok_values(records, "bits_per_weight").items()}
    panels: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for (model, cell, tag), y in ppl.items():
        if (model, cell) in bits:
            panels.setdefault((model, tag), []).append((cell, bits[(model, cell)], y))
    panels = {k: v for k, v in panels.items() if len(v) >= 2}
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, ((model, tag), pts) in zip(axes, panels.items()):
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        front = pareto_front(list(zip(xs, ys)))
        ax.scatter(xs, ys, color="#9aa5b1", zorder=2, label="cells")
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#d1495b", zorder=3)
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], color="#d1495b", zorder=4,
                   label="Pareto frontier")
        for name, x, y in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_plt().FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel("bits / weight (effective, incl. scales)")
        ax.set_ylabel(f"perplexity [{tag}] (log)")
        ax.set_yscale("log")  # collapsed cells (ternary PTQ: 1e8) must not flatten the others
        ax.set_title(f"{model}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bits/weight vs perplexity (lower-left is better)", fontsize=11)
    return _save(fig, out_dir, "pareto_bits_ppl")


def plot_latency_memory(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    lat = _ok_values(records, "decode_ms_per_token")
    mem = {(m, c): v for (m, c, _), v in _ok_values(records, "weight_bytes").items()}
    panels: dict[str, list[tuple[str, str, float, float]]] = {}
    for (model, cell, tag), y in lat.items():
        if (model, cell) in mem:
            panels.setdefault(model, []).append((cell, tag, mem[(model, cell)] * 1e-6, y))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, (model, pts) in zip(axes, panels.items()):
        for tag in dict.fromkeys(p[1] for p in pts):
            sel = [p for p in pts if p[1] == tag]
            ax.scatter([p[2] for p in sel], [p[3] for p in sel], label=tag or "decode", zorder=3)
            for name, _, x, y in sel:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("weight memory (MB)")
        ax.set_ylabel("decode latency, p50 (ms / token)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("decode latency vs weight memory", fontsize=11)
    return _save(fig, out_dir, "latency_memory")


def plot_kv_bits_ppl(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    ppl = _ok_values(records, "perplexity")
    cells = _by_cell(records)
    panels: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    fp_ppl: dict[tuple[str, str], float] = {}
    for (model, cell, tag), y in ppl.items():
        recs = cells.get((model, cell), [])
        if recs and recs[0]["method"] == "fp":
            fp_ppl[(model, tag)] = y
        b = kv_bits(recs)
        if b is not None:
            panels.setdefault((model, tag), []).append((cell, b, y))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, ((model, tag), pts) in zip(axes, panels.items()):
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="#2e86ab", zorder=3)
        for name, x, y in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if (model, tag) in fp_ppl:
            ax.axhline(fp_ppl[(model, tag)], color="#555", ls="--", lw=1, label="fp")
            ax.legend(fontsize=7)
        ax.set_xlabel("KV-cache bits / element")
        ax.set_ylabel(f"perplexity [{tag}] (log)")
        ax.set_yscale("log")
        ax.set_title(model, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle("KV-cache bits vs perplexity", fontsize=11)
    return _save(fig, out_dir, "kv_bits_ppl")


def plot_sensitivity(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    paths: list[Path] = []
    found = [d / "sensitivity.json" for d in run_dirs if (d / "sensitivity.json").exists()]
    for i, path in enumerate(found):
        try:
            doc = json.loads(path.read_text())
            layers, projs, values = list(doc["layers"]), list(doc["projections"]), doc["values"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        import numpy as np

        arr = np.array(values, dtype=float)
        if arr.shape == (len(projs), len(layers)):
            arr = arr.T
        if arr.shape != (len(layers), len(projs)):
            log.warning("skipping %s: values shape %s does not match %d layers x %d projections",
                        path, arr.shape, len(layers), len(projs))
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(projs) + 2), max(3.0, 0.28 * len(layers) + 1.5)))
        im = ax.imshow(arr, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(projs)), [str(p) for p in projs], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xlabel("projection")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label=str(doc.get("metric", "sensitivity")))
        ax.set_title(str(doc.get("title", f"layer sensitivity ({path.parent.name})")), fontsize=10)
        paths += _save(fig, out_dir, "sensitivity" if len(found) == 1 else f"sensitivity_{i}")
    return paths


def _curve(obj: Any) -> tuple[list[float], list[float]] | None:
    """(steps, losses) from a list of numbers, a list of [step, loss] / {"step", "loss"} or a dict of lists."""
    if isinstance(obj, dict):
        if "loss_curve" in obj:
            return _curve(obj["loss_curve"])
        loss = obj.get("loss") or obj.get("losses")
        if isinstance(loss, list):
            steps = obj.get("step") or obj.get("steps") or list(range(len(loss)))
            return [float(s) for s in steps], [float(v) for v in loss]
        return None
    if isinstance(obj, list) and obj:
        if all(isinstance(v, (int, float)) for v in obj):
            return [float(i) for i in range(len(obj))], [float(v) for v in obj]
        if all(isinstance(v, (list, tuple)) and len(v) >= 2 for v in obj):
            return [float(v[0]) for v in obj], [float(v[1]) for v in obj]
        if all(isinstance(v, dict) and "loss" in v for v in obj):
            return [float(v.get("step", i)) for i, v in enumerate(obj)], [float(v["loss"]) for v in obj]
    return None


def loss_curves(run_dirs: list[Path]) -> dict[str, tuple[list[float], list[float]]]:
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for d in run_dirs:
        cells = d / "cells"
        if not cells.is_dir():
            continue
        # cells/<model>/<cell>/ (older runs: cells/<cell>/)
        found_dirs = {f.parent.parent for f in cells.rglob("bitnet-qat/loss_curve.json")}
        found_dirs |= {f.parent for f in cells.rglob("artifacts.json")}
        for cell in sorted(found_dirs):
            rel = cell.relative_to(cells).as_posix()
            label = rel if len(run_dirs) == 1 else f"{d.name}/{rel}"
            found = None
            f = cell / "bitnet-qat" / "loss_curve.json"
            try:
                if f.exists():
                    found = _curve(json.loads(f.read_text()))
                elif (cell / "artifacts.json").exists():
                    arts = json.loads((cell / "artifacts.json").read_text())
                    for a in arts.values() if isinstance(arts, dict) else []:
                        if isinstance(a, dict) and "loss_curve" in a:
                            found = _curve(a["loss_curve"])
                            break
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping loss curve of %s: %s", cell, e)
            if found and found[1]:
                curves[label] = found
    return curves


def plot_qat_loss(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    curves = loss_curves(run_dirs)
    if not curves:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    lo = min(v for _, loss in curves.values() for v in loss)
    hi = max(v for _, loss in curves.values() for v in loss)
    if lo > 0 and hi / lo > 20:  # log scale only when the curve spans orders of magnitude
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("QAT loss curve", fontsize=10)
    return _save(fig, out_dir, "qat_loss")


# --------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;
 color:#1f2933;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d9e2ec;padding-bottom:4px}
table.lb{border-collapse:collapse;margin:8px 0 4px;font-variant-numeric:tabular-nums}
table.lb th,table.lb td{padding:4px 9px;border-bottom:1px solid #e4e7eb;white-space:nowrap}
table.lb th{background:#f0f4f8;cursor:pointer;user-select:none;text-align:left;font-weight:600;font-size:12.5px}
table.lb th:hover{background:#d9e2ec}
table.lb th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
table.lb th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
table.lb td.num{text-align:right}table.lb tr.fp td{background:#f7fbff;font-weight:600}
td.bad{color:#b42318}td.good{color:#067647}td.st-failed{color:#b42318;font-weight:600}
td.st-partial{color:#b54708}.note{color:#52606d;font-size:12.5px}
.plots img{max-width:100%;border:1px solid #e4e7eb;margin:8px 0}
footer{margin-top:32px;border-top:1px solid #d9e2ec;padding-top:8px;font-size:12.5px;color:#52606d}
footer code{font-size:12px}ul.nm{font-size:12.5px}
"""

JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');
    if(v===null||v===''){return null;} var n=Number(v); return isNaN(n)?v.toLowerCase():n;}
  document.querySelectorAll('table.lb').forEach(function(t){
    t.querySelectorAll('thead th').forEach(function(th,col){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('aria-sort')!=='ascending';
        t.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('aria-sort');});
        th.setAttribute('aria-sort',asc?'ascending':'descending');
        var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){
          var x=key(a.cells[col]), y=key(b.cells[col]);
          if(x===null&&y===null){return 0;} if(x===null){return 1;} if(y===null){return -1;}
          var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
          return asc?c:-c;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""

def _data_v(v: Any) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return ""
    return repr(float(v)) if isinstance(v, (int, float)) else str(v)


def _table_html(g: pd.DataFrame, metric_cols: list[str], derived: list[str], table_id: str) -> str:
    e = html.escape
    header = ["cell", "method"] + metric_cols + derived + ["status"]
    out = [f'<table class="lb" id="{e(table_id)}"><thead><tr>']
    out += [f'<th scope="col" title="click to sort">{e(h)}</th>' for h in header]
    out.append("</tr></thead><tbody>")
    for _, row in g.iterrows():
        cls = ' class="fp"' if row["method"] == "fp" else ""
        tds = [f'<td data-v="{e(str(row["cell"]))}">{e(str(row["cell"]))}</td>',
               f'<td data-v="{e(str(row["method"]))}">{e(str(row["method"]))}</td>']
        for c in metric_cols:
            v = row[c]
            tds.append(f'<td class="num" data-v="{e(_data_v(v))}">{e(_fmt(v, c))}</td>')
        for c in derived:
            v = row[c]
            tone = ""
            if pd.notna(v):
                worse = v > 1e-12 if c.startswith("Δ") else v < 1 - 1e-12
                better = v < -1e-12 if c.startswith("Δ") else v > 1 + 1e-12
                tone = " bad" if worse else (" good" if better else "")
            tds.append(f'<td class="num{tone}" data-v="{e(_data_v(v))}">{e(_fmt_derived(v, c))}</td>')
        st = str(row["status"])
        tds.append(f'<td class="st-{e(st)}" data-v="{e(st)}">{e(st)}</td>')
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _footer_html(run_dirs: list[Path], records_by_run: dict[Path, list[dict[str, Any]]]) -> str:
    e = html.escape
    parts = ["<footer><h3>Provenance</h3>"]
    for d in run_dirs:
        env = run_env(d, records_by_run.get(d, []))
        v = env.get("versions") or {}
        hw = env.get("hardware") or {}
        sha = env.get("git_sha")
        vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
        mem = hw.get("memory_bytes")
        parts.append(
            f"<p>Run <code>{e(d.name)}</code>: git <code>{e(str(sha)[:12] if sha else 'unknown')}</code>"
            f"{' (dirty)' if env.get('dirty') else ''}; {e(vers)}.<br>"
            f"Hardware: {e(str(hw.get('cpu')))} ({e(str(hw.get('cores')))} cores"
            f"{f', {mem / 2**30:.0f} GiB' if isinstance(mem, (int, float)) else ''}), GPU {e(str(hw.get('gpu')))}, "
            f"torch threads {e(str(env.get('threads')))}.</p>")
    protos: dict[tuple[str, str], dict[str, Any]] = {}
    for recs in records_by_run.values():
        for r in recs:
            if r.get("protocol"):
                protos.setdefault((r["metric"], protocol_tag(r)), r["protocol"])
    if protos:
        parts.append("<p>Protocols (a metric column's <code>[tag]</code> names its protocol; "
                     "different protocols never share a column):</p><ul>")
        for (metric, tag), p in sorted(protos.items()):
            proto = e(json.dumps(p, sort_keys=True))
            parts.append(f"<li><code>{e(metric)}</code> [{e(tag)}]: <code>{proto}</code></li>")
        parts.append("</ul>")
    parts.append("</footer>")
    return "".join(parts)


def render_html(records: list[dict[str, Any]], run_dirs: list[Path], plots: list[Path] | None = None,
                title: str = "quantbench leaderboard") -> str:
    """The leaderboard as one self-contained HTML page (inline CSS/JS, plots as data URIs)."""
    e = html.escape
    wide = leaderboard(records)
    body: list[str] = [f"<h1>{e(title)}</h1>"]
    if wide.empty:
        body.append("<p>(no records)</p>")
    else:
        suites = ", ".join(dict.fromkeys(wide["suite"]))
        body.append(f'<p class="note">Suite(s): {e(suites)}. Click a column header to sort. '
                    "Δ and recovery are relative to the unquantized (fp) row of the same model. "
                    f"Memory columns in MB (10<sup>6</sup> bytes; scaled {', '.join(scaled_metrics())}).</p>")
        for n, ((suite, model), g) in enumerate(wide.groupby(["suite", "model"], sort=False)):
            g = g.dropna(axis=1, how="all")
            g_cols = [c for c in metric_columns(wide) if c in g.columns]
            g2, derived = vs_fp(g[[c for c in g.columns if c in ID_COLUMNS or c in g_cols or c == "status"]])
            derived = [c for c in derived if g2[c].notna().any()]
            body.append(f'<section data-suite="{e(str(suite))}" data-model="{e(str(model))}">'
                        f"<h2>{e(str(suite))} — {e(str(model))}</h2>")
            body.append(_table_html(g2, g_cols, derived, f"lb-{n}"))
            body.append("</section>")
    bad = [r for r in latest(records) if r["status"] != "ok"]
    if bad:
        body.append("<h3>Not measured</h3><ul class=\"nm\">")
        seen = set()
        for r in bad:
            k = (r["model"]["name"], r["cell"], r["metric"], r["status"], r["error"])
            if k not in seen:
                seen.add(k)
                body.append(f"<li><code>{e(r['model']['name'])}/{e(r['cell'])}</code> {e(r['metric'])}: "
                            f"{e(r['status'])} — {e(str(r['error']))}</li>")
        body.append("</ul>")
    details = method_detail_items(run_dirs, records)
    if details:
        body.append("<h3>Method details</h3><ul>" + "".join(
            f"<li><code>{e(cell)}</code> ({e(model)}{'' if b is None else f', {b:.3f} bits/w'}): {e(text)}</li>"
            for cell, model, b, text in details) + "</ul>")
    kv_rows = kv_scaling_rows(records)
    if kv_rows:
        body.append("<h3>KV cache for Llama-3-70B at 128k tokens (calculator)</h3><p class=\"note\">L=80, H_kv=8, "
                    "d_h=128, T=131072, batch 1; each KV cell's configuration with its overheads.</p>"
                    "<table><thead><tr><th>cell</th><th>method</th><th>GB</th><th>bits/element</th></tr></thead><tbody>"
                    + "".join(f"<tr><td>{e(r['cell'])}</td><td>{e(r['method'])}</td><td>{r['GB']:.2f}</td>"
                              f"<td>{r['bits_per_element']:.3f}</td></tr>" for r in kv_rows)
                    + "</tbody></table>")
    pngs = [p for p in plots or [] if p.suffix == ".png" and p.exists()]
    if pngs:
        body.append('<h2>Plots</h2><div class="plots">')
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            body.append(f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{data}">'
                        f'<figcaption class="note">{e(p.stem)} (also {e(p.stem)}.svg)</figcaption></figure>')
        body.append("</div>")
    by_run: dict[Path, list[dict[str, Any]]] = {}
    for d in run_dirs:
        by_run[d] = load_runs([d])
    body.append(_footer_html(run_dirs, by_run))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{JS}</script></body></html>\n")


# --------------------------------------------------------------------------- entry point
def render_extras(run_dirs: Iterable[str | Path], out_dir: str | Path | None = None,
                  screenshot: bool | None = None) -> dict[str, list[Path]]:
    """Write leaderboard.html, the plots and (when Chromium is installed) leaderboard.png.

    ``screenshot=None`` takes a screenshot when Chromium is found and ``QUANTBENCH_SCREENSHOT`` is not 0.
    Returns the written paths by kind ("html", "plots", "screenshot")."""
    dirs = [Path(d) for d in run_dirs]
    out = Path(out_dir) if out_dir else (dirs[0] if dirs[0].is_dir() else dirs[0].parent)
    records = load_runs(dirs)  # read and checked before anything is written
    for d in dirs:
        if d.is_dir():
            read_env(d)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    for fn in (plot_bits_ppl, plot_latency_memory, plot_kv_bits_ppl):
        try:
            plots += fn(records, out)
        except Exception as e:  # a plot never fails a run
            log.warning("plot %s failed: %s", fn.__name__, e)
    for fn2 in (plot_sensitivity, plot_qat_loss):
        try:
            plots += fn2(dirs, out)
        except Exception as e:
            log.warning("plot %s failed: %s", fn2.__name__, e)
    html_path = out / "leaderboard.html"
    html_path.write_text(render_html(records, dirs, plots), encoding="utf-8")
    written: dict[str, list[Path]] = {"html": [html_path], "plots": plots, "screenshot": []}
    if screenshot is None:
        screenshot = os.environ.get("QUANTBENCH_SCREENSHOT", "1") != "0"
    if screenshot:
        if browser.find_chromium():
            try:
                written["screenshot"].append(browser.screenshot(html_path, out / "leaderboard.png"))
            except Exception as e:
                log.warning("screenshot of %s failed: %s", html_path, e)
        else:
            log.debug("no chromium: no screenshot of %s", html_path)
    log.info("published %s (%d plot files)", html_path, len(plots))
    return written
