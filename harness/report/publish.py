"""Published artefacts of one or more runs: a self-contained leaderboard.html, plots (PNG + SVG) and a
screenshot of the page.

Plots (each skipped quietly when its data is absent):

- ``pareto_bits_ppl``: bits/weight vs perplexity per model and protocol, Pareto frontier marked;
- ``latency_memory``: decode latency (p50 ms/token) vs weight memory;
- ``kv_bits_ppl``: KV-cache bits vs perplexity for cells whose chain quantizes the KV cache;
- ``sensitivity``: a run's ``sensitivity.json`` ({"layers", "projections", "values"}) as a heatmap;
- ``qat_loss``: training loss curves (QAT, fp-train: ``cells/*/bitnet-qat/loss_curve.json`` or
  ``"loss_curve"`` in a cell's ``artifacts.json``), one panel per model, so a from-scratch pair (fp vs
  b1.58 vs 1-bit) sits side by side in its model's panel;
- ``alpha_sweep`` (+ ``alpha_sweep.csv``): SmoothQuant's migration strength alpha against perplexity
  (naive W8A8, LLM.int8() and fp as reference lines) and against the outlier statistics its cells record
  (median over layers of the max / median input-channel absmax, activations and weights, after smoothing).
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

from ...methods.kvcalc import kv_cache_bytes
from . import browser
from .leaderboard import (
    FAMILIES,
    FAMILY_TITLES,
    GROUPS,
    Section,
    baseline_label,
    board,
    chain,
    compact,
    family,
    is_noisy,
    kv_scaling_rows,
    latest,
    load_runs,
    method_detail_items,
    not_measured,
    protocol_tag,
    quantizes_kv,
    read_env,
    run_env,
    scaled_metrics,
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


def kv_bits(cell_records: list[dict[str, Any]]) -> float | None:
    """KV-cache bits of a cell: from a record's protocol (``kv_bits``, or ``bits`` of the
    kv_bytes_per_token record), else from the KV method's config, else (no bits parameter: the fp16
    cache) the bits per element of the method's byte formula; None for cells that leave the cache alone."""
    kv_conf = [c for r in cell_records[:1] for c in chain(r) if quantizes_kv(c.get("method"))]
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


FAMILY_COLORS = {"baseline": "#52606d", "weight": "#2e86ab", "activation": "#d1495b", "kv": "#6a994e"}
Y_CAP = 5.0  # the ppl axis ends at Y_CAP x the baseline's perplexity; cells beyond it sit at the edge


def _rec_of(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(model, cell, protocol tag) -> the latest ok record of ``metric`` with a value."""
    return {(r["model"]["name"], r["cell"], protocol_tag(r)): r for r in latest(records)
            if r["metric"] == metric and r["status"] == "ok" and isinstance(r["value"], (int, float))}


def _baselines(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model -> the first record of its baseline (method fp) cell."""
    out: dict[str, dict[str, Any]] = {}
    for r in latest(records):
        if family(r) == "baseline":
            out.setdefault(r["model"]["name"], r)
    return out


def place_labels(ax: Any, pts: list[tuple[float, float]], texts: list[str], fontsize: float = 7.5) -> None:
    """Write ``texts`` beside ``pts`` (data coordinates) without overlaps: each label takes the first of
    twelve offsets around its point whose rendered box meets no label or point placed before it, with a
    leader line when it had to move away from its point (all taken: the first offset)."""
    from matplotlib.transforms import Bbox  # deferred: matplotlib is optional

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = [tuple(ax.transData.transform(p)) for p in pts]
    taken: list[Any] = [Bbox.from_extents(x - 4, y - 4, x + 4, y + 4) for x, y in px]
    offsets = [(5, 3), (5, -3), (-5, 3), (-5, -3), (6, 14), (6, -14), (-6, 14), (-6, -14), (16, 26), (16, -26),
               (-16, 26), (-16, -26), (30, 0), (-30, 0)]
    for text, p in zip(texts, pts):
        for k, (dx, dy) in enumerate(offsets + [offsets[0]]):
            far = abs(dy) > 10 or abs(dx) > 10
            t = ax.annotate(text, p, xytext=(dx, dy), textcoords="offset pixels", fontsize=fontsize,
                            ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#9aa5b1", "shrinkA": 0,
                                        "shrinkB": 3} if far else None)
            box = t.get_window_extent(renderer)
            if k == len(offsets) or not any(box.overlaps(o) for o in taken):
                taken.append(box)
                break
            t.remove()


def _numbered(ax: Any, names: list[str]) -> None:
    """The key of a panel's numbered labels, beside it."""
    ax.text(1.02, 1.0, "\n".join(f"{i + 1:>2}  {n}" for i, n in enumerate(names)), transform=ax.transAxes,
            va="top", ha="left", fontsize=7, family="monospace")


def _ppl_panel(ax: Any, pts: list[tuple[str, str, float, float, float | None]], base_ppl: float | None,
               base_name: str | None, xlabel: str, tag: str, frontier: bool) -> None:
    """A perplexity panel: points (cell, family, x, ppl, stderr) with error bars, the y axis up to Y_CAP x the
    baseline (cells beyond it drawn at the edge with their value), the baseline as a dashed line and,
    when asked, the Pareto frontier of the cells on scale."""
    ref = base_ppl if base_ppl else min(p[3] for p in pts)
    cap = Y_CAP * ref
    on = [p for p in pts if p[3] <= cap]
    off = [p for p in pts if p[3] > cap]
    for fam in dict.fromkeys(p[1] for p in on):
        sel = [p for p in on if p[1] == fam]
        ax.errorbar([p[2] for p in sel], [p[3] for p in sel], yerr=[p[4] or 0.0 for p in sel], fmt="o", ms=5,
                    color=FAMILY_COLORS.get(fam, "#333"), ecolor="#9aa5b1", elinewidth=1, capsize=2, zorder=3,
                    label=FAMILY_TITLES.get(fam, fam))
    if frontier and len(on) >= 2:
        front = pareto_front([(p[2], p[3]) for p in on])
        ax.step([on[i][2] for i in front], [on[i][3] for i in front], where="post", color="#f0a202", lw=1.2,
                zorder=2, label="Pareto frontier (on scale)")
    if base_ppl:
        ax.axhline(base_ppl, color=FAMILY_COLORS["baseline"], ls="--", lw=1,
                   label=f"{base_name or 'baseline'}: {compact(base_ppl)}")
    lo = min([p[3] - (p[4] or 0) for p in on] + ([base_ppl] if base_ppl else []))
    ax.set_ylim(max(0.0, lo - 0.05 * (cap - lo)), cap * 1.04)
    xs = [p[2] for p in pts]
    pad = 0.08 * (max(xs) - min(xs)) if max(xs) > min(xs) else 0.5
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    for p in off:
        ax.plot([p[2]], [cap], marker="^", ms=7, color=FAMILY_COLORS.get(p[1], "#333"), zorder=4, clip_on=False)
    if off:
        ax.plot([], [], "^", color="#52606d", label=f"off scale (> {Y_CAP:g}x baseline), value in the key")
    names = [p[0] for p in on] + [f"{p[0]} (ppl {compact(p[3])})" for p in off]
    place_labels(ax, [(p[2], p[3]) for p in on] + [(p[2], cap) for p in off],
                 [str(i + 1) for i in range(len(names))])
    _numbered(ax, names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"perplexity [{tag}] ± stderr")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def plot_bits_ppl(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """bits/weight vs perplexity: one panel per (model, protocol, family): weight-only and weight+activation
    methods apart, KV-cache methods left to :func:`plot_kv_bits_ppl`; the baseline a dashed line."""
    ppl = _rec_of(records, "perplexity")
    bits = {(m, c): r["value"] for (m, c, _), r in _rec_of(records, "bits_per_weight").items()}
    fams = {(r["model"]["name"], r["cell"]): family(r) for r in latest(records)}
    bases = _baselines(records)
    panels: dict[tuple[str, str, str], list[tuple[str, str, float, float, float | None]]] = {}
    base_ppl: dict[tuple[str, str], float] = {}
    for (model, cell, tag), r in ppl.items():
        fam = fams[(model, cell)]
        if fam == "baseline":
            base_ppl[(model, tag)] = float(r["value"])
        elif fam in ("weight", "activation") and (model, cell) in bits:
            se = r.get("stderr") if isinstance(r.get("stderr"), (int, float)) else None
            panels.setdefault((model, tag, fam), []).append((cell, fam, float(bits[(model, cell)]),
                                                             float(r["value"]), se))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, ((model, tag, fam), pts) in zip(axes, panels.items()):
        b = bases.get(model)
        _ppl_panel(ax, pts, base_ppl.get((model, tag)), baseline_label(b) if b else None,
                   "bits / weight (effective, incl. scales)", tag, frontier=True)
        ax.set_title(f"{model}: {FAMILY_TITLES[fam]} methods", fontsize=10)
    fig.suptitle("bits/weight vs perplexity (lower-left is better)", fontsize=11)
    return _save(fig, out_dir, "pareto_bits_ppl")


def plot_latency_memory(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Decode latency (p50, bars to p10/p90 where recorded; hollow: a noisy measurement) vs weight memory."""
    lat = _rec_of(records, "decode_ms_per_token")
    mem = {(m, c): r["value"] for (m, c, _), r in _rec_of(records, "weight_bytes").items()}
    fams = {(r["model"]["name"], r["cell"]): family(r) for r in latest(records)}
    bases = _baselines(records)
    panels: dict[tuple[str, str], list[tuple[str, dict[str, Any], float]]] = {}
    for (model, cell, tag), r in lat.items():
        if (model, cell) in mem:
            panels.setdefault((model, tag), []).append((cell, r, mem[(model, cell)] * 1e-6))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, ((model, tag), pts) in zip(axes, panels.items()):
        names = []
        xy = []
        for cell, r, x in pts:
            y = float(r["value"])
            p = r.get("protocol") or {}
            lo = float(p["decode_ms_p10"]) if isinstance(p.get("decode_ms_p10"), (int, float)) else y
            hi = float(p["decode_ms_p90"]) if isinstance(p.get("decode_ms_p90"), (int, float)) else y
            fam = fams[(model, cell)]
            col = FAMILY_COLORS.get(fam, "#333")
            ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt="o", ms=5, ecolor="#9aa5b1",
                        elinewidth=1, capsize=2, color=col, mfc="white" if is_noisy(r) else col, zorder=3)
            b = bases.get(model)
            names.append(baseline_label(b) if fam == "baseline" and b else cell)
            xy.append((x, y))
        for fam in dict.fromkeys(fams[(model, c)] for c, _, _ in pts):
            ax.plot([], [], "o", color=FAMILY_COLORS.get(fam, "#333"), label=FAMILY_TITLES.get(fam, fam))
        if any(is_noisy(r) for _, r, _ in pts):
            ax.plot([], [], "o", color="#52606d", mfc="white", label="noisy measurement")
        place_labels(ax, xy, [str(i + 1) for i in range(len(xy))])
        _numbered(ax, names)
        ax.set_xlabel("weight memory (MB, all weights)")
        ax.set_ylabel("decode latency p50 (ms / token), bars p10–p90")
        ax.set_title(f"{model} [{tag}]", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("decode latency vs weight memory", fontsize=11)
    return _save(fig, out_dir, "latency_memory")


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def kv_bits_per_element(records: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(model, cell) -> KV-cache bits per cached element, from the ``kv_bytes_per_token`` records: the
    measured bytes per token x 8 over the elements per token (the protocol's ``elements_per_token`` when
    recorded, else the baseline cell's bytes per token over its dtype's size)."""
    kv = {(m, c): r for (m, c, _), r in _rec_of(records, "kv_bytes_per_token").items()}
    bases = _baselines(records)
    elems: dict[str, float] = {}
    for model, b in bases.items():
        r = kv.get((model, b["cell"]))
        dtype = next((c.get("dtype") for c in chain(b) if isinstance(c.get("dtype"), str)), None) or (
            b.get("model") or {}).get("dtype")
        if r is not None and dtype in _DTYPE_BYTES:
            elems[model] = float(r["value"]) / _DTYPE_BYTES[dtype]
    out = {}
    for (model, cell), r in kv.items():
        n = (r.get("protocol") or {}).get("elements_per_token") or elems.get(model)
        if isinstance(n, (int, float)) and n > 0:
            out[(model, cell)] = 8 * float(r["value"]) / n
    return out


def plot_kv_bits_ppl(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """KV-cache bits per element (measured cache bytes, incl. scales and outliers) vs perplexity for the
    cells that quantize the KV cache; the baseline (its cache in its dtype) a dashed line."""
    ppl = _rec_of(records, "perplexity")
    cells = _by_cell(records)
    per_elem = kv_bits_per_element(records)
    bases = _baselines(records)
    panels: dict[tuple[str, str], list[tuple[str, str, float, float, float | None]]] = {}
    base_ppl: dict[tuple[str, str], float] = {}
    for (model, cell, tag), r in ppl.items():
        recs = cells.get((model, cell), [])
        if recs and family(recs[0]) == "baseline":
            base_ppl[(model, tag)] = float(r["value"])
        if not recs or family(recs[0]) != "kv":
            continue
        x = per_elem.get((model, cell))
        if x is None:
            x = kv_bits(recs)
        if x is not None:
            se = r.get("stderr") if isinstance(r.get("stderr"), (int, float)) else None
            panels.setdefault((model, tag), []).append((cell, "kv", x, float(r["value"]), se))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    for ax, ((model, tag), pts) in zip(axes, panels.items()):
        b = bases.get(model)
        bx = per_elem.get((model, b["cell"])) if b else None
        name = (baseline_label(b) + (f", cache {bx:g} bits" if bx else "")) if b else None
        _ppl_panel(ax, pts, base_ppl.get((model, tag)), name, "KV-cache bits / element (measured bytes x 8 / "
                   "elements, incl. scales and outliers)", tag, frontier=False)
        ax.set_title(f"{model}: KV-cache methods", fontsize=10)
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
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}  # model (label's folder) -> cell -> curve
    for label, curve in curves.items():
        model, _, cell = label.rpartition("/")
        panels.setdefault(model, {})[cell] = curve
    fig, axes = _grid(len(panels))
    for ax, (model, cells) in zip(axes, panels.items()):
        for cell, (steps, loss) in cells.items():
            ax.plot(steps, loss, label=cell, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token; KL to the fp logits when distilled)", fontsize=8)
        lo = min(v for _, loss in cells.values() for v in loss)
        hi = max(v for _, loss in cells.values() for v in loss)
        if lo > 0 and hi / lo > 20:  # log scale only when the curve spans orders of magnitude
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"training loss: {model}" if model else "training loss", fontsize=10)
    return _save(fig, out_dir, "qat_loss")


def _primary_ppl(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, cell) -> the latest ok perplexity record of the primary eval (the first of an ``eval:`` list)."""
    return {(m, c): r for (m, c, _), r in _rec_of(records, "perplexity").items()
            if (r.get("protocol") or {}).get("eval_index") in (None, 0)}


def alpha_sweep_rows(run_dirs: list[Path], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per smoothquant / w8a8 cell with outlier diagnostics in its ``artifacts.json``: model, cell,
    method, alpha (None for w8a8), its perplexity, and per smoothing group the median over layers of the
    activations' and the weights' max / median input-channel absmax after smoothing (``act_<group>``,
    ``w_<group>``)."""
    ppl = {k: r["value"] for k, r in _primary_ppl(records).items()}
    rows = []
    for d in run_dirs:
        for f in sorted((d / "cells").rglob("artifacts.json")) if (d / "cells").is_dir() else []:
            try:
                arts = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                log.warning("skipping %s: %s", f, e)
                continue
            for method in ("smoothquant", "w8a8"):
                a = arts.get(method) if isinstance(arts, dict) else None
                if not isinstance(a, dict) or not a.get("outliers"):
                    continue
                cell, model = f.parent.name, f.parent.parent.name
                row: dict[str, Any] = {"model": model, "cell": cell, "method": method, "alpha": a.get("alpha"),
                                       "perplexity": ppl.get((model, cell))}
                for g in dict.fromkeys(o["group"] for o in a["outliers"]):
                    os_ = [o for o in a["outliers"] if o["group"] == g]
                    for key, col in (("after", "act"), ("w_after", "w")):
                        vals = sorted(float(o[key]) for o in os_ if o.get(key) is not None)
                        if vals:
                            row[f"{col}_{g}"] = vals[len(vals) // 2] if len(vals) % 2 else (
                                vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
                rows.append(row)
    return rows


def plot_alpha_sweep(run_dirs: list[Path], records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    rows = alpha_sweep_rows(run_dirs, records)
    sweep = sorted((r for r in rows if r["alpha"] is not None and r["perplexity"] is not None
                    and "static" not in r["cell"]), key=lambda r: r["alpha"])
    if len(sweep) < 2:
        return []
    import pandas as pd  # deferred: pandas is only needed for the table

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "alpha_sweep.csv", index=False)
    fig, axes = _grid(2)
    ax, ax2 = axes
    xs = [r["alpha"] for r in sweep]
    ax.plot(xs, [r["perplexity"] for r in sweep], "o-", color=FAMILY_COLORS["activation"], label="smoothquant")
    model = sweep[0]["model"]
    for (m, cell), r in _primary_ppl(records).items():  # reference lines: fp, naive W8A8, LLM.int8()
        fam, meth = family(r), str(r["method"])
        if m == model and (fam == "baseline" or (meth in ("w8a8", "llm-int8") and "static" not in cell)):
            color = {"w8a8": FAMILY_COLORS["weight"], "llm-int8": FAMILY_COLORS["kv"]}.get(
                meth, FAMILY_COLORS["baseline"])
            ax.axhline(r["value"], ls="--" if fam == "baseline" else ":", lw=1.3, color=color, label=cell)
    ax.set_xlabel("alpha (migration strength)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"SmoothQuant alpha sweep: {model}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    groups = sorted({k[4:] for r in sweep for k in r if k.startswith("act_")})
    for g in groups:
        line = ax2.plot(xs, [r.get(f"act_{g}") for r in sweep], "o-", label=f"activations ({g})")[0]
        ax2.plot(xs, [r.get(f"w_{g}") for r in sweep], "s--", color=line.get_color(), label=f"weights ({g})")
    ax2.set_yscale("log")
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("max / median input-channel absmax (median over layers)", fontsize=8)
    ax2.set_title("outliers after smoothing", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    return _save(fig, out_dir, "alpha_sweep")


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
div.tw{overflow-x:auto;max-width:100%}table.lb{font-size:13px}
table.lb th,table.lb td{padding:3px 6px}table.lb th{white-space:normal;overflow-wrap:anywhere;min-width:3.5em;
 vertical-align:bottom}table.lb td:first-child{white-space:normal;min-width:9em}
table.lb tr.groups th{background:#fff;cursor:default;text-align:center;border-bottom:2px solid #9fb3c8}
table.lb th.grp{font-size:12px;color:#334e68;text-transform:uppercase;letter-spacing:.04em}
ul.legend{font-size:12.5px;color:#52606d;margin:4px 0 12px}form.filters{font-size:13px;margin:6px 0}
form.filters label{margin-right:10px}
"""

JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');
    if(v===null||v===''){return null;} var n=Number(v); return isNaN(n)?v.toLowerCase():n;}
  document.querySelectorAll('table.lb').forEach(function(t){
    var heads=t.tHead.rows[t.tHead.rows.length-1].cells;
    Array.prototype.forEach.call(heads,function(th,col){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('aria-sort')!=='ascending';
        Array.prototype.forEach.call(heads,function(h){h.removeAttribute('aria-sort');});
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
  document.querySelectorAll('form.filters').forEach(function(f){
    var t=document.getElementById(f.getAttribute('data-for'));
    function apply(){
      var fams={}; f.querySelectorAll('input[type=checkbox]').forEach(function(c){fams[c.value]=c.checked;});
      var sel=f.querySelector('select'), max=sel&&sel.value!==''?Number(sel.value):null, shown=0;
      Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
        var b=r.getAttribute('data-bits'), fam=r.getAttribute('data-family');
        var ok=fams[fam]!==false&&(max===null||(b!==''&&Number(b)<=max)||fam==='baseline');
        r.hidden=!ok; if(ok){shown++;}
      });
      var n=f.querySelector('.shown'); if(n){n.textContent=shown+' of '+t.tBodies[0].rows.length+' rows';}
    }
    f.addEventListener('change',apply); apply();
  });
})();
"""

def _data_v(v: Any) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return ""
    return repr(float(v)) if isinstance(v, (int, float)) else str(v)


def bits_class(bits: float | None) -> int | None:
    """The nominal bit class of an effective bits/weight (4.17 -> 4, 5.53 -> 5, 2.998 -> 3): the filter's unit."""
    return None if bits is None else int(math.floor(bits + 0.25))


def _filters_html(sec: Section, table_id: str) -> str:
    e = html.escape
    fams = [f for f in FAMILIES if any(r.family == f for r in sec.rows)]
    classes = sorted({c for r in sec.rows if r.family != "baseline" for c in [bits_class(r.bits)] if c is not None})
    out = [f'<form class="filters" data-for="{e(table_id)}"">Show: ']
    out += [f'<label><input type="checkbox" name="family" value="{e(f)}" checked> {e(FAMILY_TITLES[f])}</label> '
            for f in fams]
    if classes:
        out.append('<label>bits/w <select name="bits"><option value="">any</option>'
                   + "".join(f'<option value="{c}">≤ {c} (nominal)</option>' for c in classes)
                   + "</select></label> ")
    out.append('<span class="shown note"></span></form>')
    return "".join(out)


def _table_html(sec: Section, table_id: str) -> str:
    e = html.escape
    status = any(r.status != "ok" for r in sec.rows)
    out = [f'<table class="lb" id="{e(table_id)}"><thead><tr class="groups"><th colspan="2"></th>']
    for g in GROUPS:
        n = sum(c.group == g for c in sec.columns)
        if n:
            out.append(f'<th colspan="{n}" class="grp">{e(g)}</th>')
    out.append("<th></th>" if status else "")
    out.append("</tr><tr>")
    header = ["cell", "method"] + [c.header for c in sec.columns] + (["status"] if status else [])
    out += [f'<th scope="col" title="click to sort">{e(h)}</th>' for h in header]
    out.append("</tr></thead><tbody>")
    for row in sec.rows:
        b = bits_class(row.bits)
        attrs = (f' data-family="{e(row.family)}" data-bits="{"" if b is None else b}"'
                 + (' class="fp"' if row.family == "baseline" else ""))
        tds = [f'<td data-v="{e(row.label)}">{e(row.label + row.marks)}</td>',
               f'<td data-v="{e(row.method)}">{e(row.method)}</td>']
        for c in sec.columns:
            v = row.values[c.key]
            tone = f" {v.tone}" if v.tone else ""
            title = f' title="stderr {v.stderr:.4g}{" (paired)" if v.paired else ""}"' if v.stderr is not None else ""
            tds.append(f'<td class="num{tone}" data-v="{e(_data_v(v.value))}"{title}>{e(v.text)}</td>')
        if status:
            tds.append(f'<td class="st-{e(row.status)}" data-v="{e(row.status)}">{e(row.status)}</td>')
        out.append(f"<tr{attrs}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    out.append('<ul class="legend">' + "".join(
        f"<li>{f'<strong>{e(h)}</strong>: ' if h else ''}{e(t)}</li>" for h, t in sec.legend) + "</ul>")
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
    sections = board(records)
    body: list[str] = [f"<h1>{e(title)}</h1>"]
    if not sections:
        body.append("<p>(no records)</p>")
    else:
        suites = ", ".join(dict.fromkeys(sec.suite for sec in sections))
        body.append(f'<p class="note">Suite(s): {e(suites)}. Click a column header to sort; filter rows by method '
                    "family and bits. Δppl and rec(overy) are relative to the baseline (unquantized) row of the same "
                    f"model. Memory columns in MB (10<sup>6</sup> bytes; scaled {', '.join(scaled_metrics())}).</p>")
        for n, sec in enumerate(sections):
            body.append(f'<section data-suite="{e(sec.suite)}" data-model="{e(sec.model)}">'
                        f"<h2>{e(sec.suite)} — {e(sec.model)}</h2>")
            if sec.baseline_label:
                body.append(f'<p class="note">Baseline: {e(sec.baseline_label)}.</p>')
            body.append(_filters_html(sec, f"lb-{n}"))
            body.append(f'<div class="tw">{_table_html(sec, f"lb-{n}")}</div>')
            body.append("</section>")
    nm = not_measured(records)
    if nm:
        body.append("<h3>Not measured</h3><ul class=\"nm\">" + "".join(
            f"<li><strong>{e(h)}</strong>: {e(t)}</li>" for h, t in nm) + "</ul>")
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
    try:
        plots += plot_alpha_sweep(dirs, records, out)
    except Exception as e:
        log.warning("plot plot_alpha_sweep failed: %s", e)
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
