"""Leaderboards from records: pandas tables, one row per cell, a column per metric (and protocol).

Every fact about a metric (column label, position, display scale and number format, protocol tag)
comes from its registered spec (:data:`quantbench.harness.measure.METRICS`); whether a method
quantizes the KV cache from its registered class (``Method.quantizes("kv")``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ...methods.base import METHODS
from ...methods.kvcalc import LLAMA3_70B, kv_cache_bytes
from ..measure import METRICS, MetricSpec
from ..run.records import read_records

ID_COLUMNS = ("suite", "model", "cell", "method")


def spec_of(metric: str) -> MetricSpec | None:
    """The registered spec of a record's metric (None for a metric this build does not know)."""
    return METRICS.get(metric) if metric in METRICS else None


def label(metric: str) -> str:
    """A metric's column label (its name when it is not registered)."""
    spec = spec_of(metric)
    return spec.label if spec else metric


def column_spec(col: str) -> MetricSpec | None:
    """The spec of the metric shown in a leaderboard column (``label [tag]``)."""
    head = col.split(" [", 1)[0]
    return next((s for _, s in METRICS.items() if s.label == head), None)


def scaled_metrics() -> list[str]:
    """The metrics whose leaderboard values are scaled (bytes shown as MB), sorted."""
    return [name for name, spec in METRICS.items() if spec.scale != 1.0]


def quantizes_kv(method: Any) -> bool:
    """Whether the registered method ``method`` (a name) quantizes the KV cache, asked of its class."""
    return isinstance(method, str) and method in METHODS and METHODS.get(method).quantizes("kv")


def protocol_tag(rec: dict[str, Any]) -> str:
    """A short label of the protocol that makes a metric comparable (never mix two in a column)."""
    spec = spec_of(rec["metric"])
    return spec.protocol_tag(rec.get("protocol") or {}) if spec else ""


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    for d in run_dirs:
        p = Path(d)
        recs.extend(read_records(p / "records.jsonl" if p.is_dir() else p))
    return recs


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (run, model, cell, metric, protocol): a resumed rerun wins."""
    # a failed cell's records carry no protocol: give them their metric's protocol from the same suite and
    # model, so a failure sits in the metric's column (and a resumed success replaces it)
    known: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("protocol"):
            known.setdefault((r["suite"], r["model"]["name"], r["metric"]), r["protocol"])
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if not r.get("protocol") and r["status"] != "ok":
            r = {**r, "protocol": known.get((r["suite"], r["model"]["name"], r["metric"]), {})}
        key = (r["run_id"], r["model"]["name"], r["cell"], r["metric"], protocol_tag(r))
        out[key] = r
    return list(out.values())


def long_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in latest(records):
        tag = protocol_tag(r)
        col = label(r["metric"]) + (f" [{tag}]" if tag else "")
        v = r["value"]
        spec = spec_of(r["metric"])
        if v is not None and spec is not None and spec.scale != 1.0:
            v = v * spec.scale
        rows.append({"suite": r["suite"], "model": r["model"]["name"], "cell": r["cell"], "method": r["method"],
                     "metric": r["metric"], "column": col, "value": v, "status": r["status"],
                     "error": r["error"], "higher_is_better": r["higher_is_better"]})
    return pd.DataFrame(rows)


def _natural(s: str) -> list[Any]:
    """Sort key with numbers compared as numbers (seq_len 64 before 128)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)]


def leaderboard(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Wide table: rows (suite, model, cell) in suite order; columns per metric+protocol."""
    df = long_table(records)
    if df.empty:
        return df
    order = {c: i for i, c in enumerate(dict.fromkeys(df["cell"]))}
    def metric_order(metric: str) -> int:
        spec = spec_of(metric)
        return spec.order if spec else 99

    cols = sorted(dict.fromkeys(df["column"]),
                  key=lambda c: (metric_order(df.loc[df["column"] == c, "metric"].iloc[0]), _natural(c)))
    idx = ["suite", "model", "cell", "method"]
    wide = df.groupby(idx + ["column"], sort=False)["value"].agg(lambda s: s.iloc[-1]).unstack("column")
    wide = wide.reindex(columns=[c for c in cols if c in wide.columns])
    wide = wide.reset_index()
    status = df.groupby(["suite", "model", "cell"])["status"].agg(
        lambda s: "ok" if s.isin(["ok", "unavailable"]).all() else ("failed" if (s == "failed").any() else "partial"))
    wide["status"] = [status.get((a, b, c), "ok") for a, b, c in zip(wide["suite"], wide["model"], wide["cell"])]
    wide["_o"] = wide["cell"].map(order)
    return wide.sort_values(["suite", "model", "_o"]).drop(columns="_o").reset_index(drop=True)


def _fmt(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "—"
    if isinstance(v, float):
        spec = column_spec(col)
        if spec is not None and spec.fmt:
            return format(v, spec.fmt)
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def fp_row(group: pd.DataFrame) -> pd.Series | None:
    """The unquantized reference row of one (suite, model) group: method ``fp`` (else a cell named fp)."""
    for mask in (group["method"] == "fp", group["cell"] == "fp"):
        if mask.any():
            return group[mask].iloc[0]
    return None


def metric_columns(wide: pd.DataFrame) -> list[str]:
    return [c for c in wide.columns if c not in ID_COLUMNS and c != "status"]


def _tag_of(col: str) -> str:
    return col[col.index("[") + 1 : -1] if "[" in col else ""


def vs_fp(wide: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add, per (suite, model), Δ vs the fp row for every perplexity column and recovery
    (value / fp value) for every accuracy column; returns the table and the added column names."""
    wide = wide.copy()
    added: list[str] = []
    for col in metric_columns(wide):
        spec = column_spec(col)
        metric = spec.name if spec else None
        if metric == "perplexity":
            name, fn = f"Δppl vs fp [{_tag_of(col)}]", (lambda v, f: v - f)
        elif metric == "accuracy":
            name, fn = f"recovery [{_tag_of(col)}]", (lambda v, f: v / f if f else float("nan"))
        else:
            continue
        vals = pd.Series(float("nan"), index=wide.index, dtype=float)
        for _, g in wide.groupby(["suite", "model"], sort=False):
            fp = fp_row(g)
            if fp is None or pd.isna(fp[col]):
                continue
            for i in g.index:
                if pd.notna(wide.at[i, col]):
                    vals[i] = fn(float(wide.at[i, col]), float(fp[col]))
        wide[name] = vals
        added.append(name)
    return wide, added


def _fmt_derived(v: Any, col: str) -> str:
    if v is None or pd.isna(v):
        return "—"
    return f"{v:+.3f}" if col.startswith("Δ") else f"{v:.3f}"


def markdown(records: list[dict[str, Any]], title: str | None = None) -> str:
    wide = leaderboard(records)
    if wide.empty:
        return "(no records)\n"
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    metric_cols = metric_columns(wide)
    wide, derived = vs_fp(wide)
    for (suite, model), g in wide.groupby(["suite", "model"], sort=False):
        lines += [f"## {suite} — {model}", ""]
        header = ["cell"] + metric_cols + derived + ["status"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|")
        for _, row in g.iterrows():
            cells = [row["cell"]] + [_fmt(row[c], c) for c in metric_cols]
            cells += [_fmt_derived(row[c], c) for c in derived]
            cells.append(row["status"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for r in latest(records) if r["status"] != "ok"]
    if failed:
        lines += ["### Not measured", ""]
        seen = set()
        for r in failed:
            key = (r["cell"], r["metric"], r["status"], r["error"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- `{r['cell']}` {r['metric']}: {r['status']} — {r['error']}")
        lines.append("")
    return "\n".join(lines)


def provenance_footer(run_dirs: Iterable[str | Path]) -> str:
    lines = []
    for d in run_dirs:
        env_path = Path(d) / "env.json"
        env: dict[str, Any] = {}
        if env_path.exists():
            env = json.loads(env_path.read_text())
        else:  # a records/baseline file: the records' own provenance
            env = next((r["provenance"] for r in load_runs([d]) if r.get("provenance")), {})
        if env:
            v = env.get("versions", {})
            hw = env.get("hardware", {})
            lines.append(
                f"Run `{Path(d).name}`: git {str(env.get('git_sha'))[:10]}{' (dirty)' if env.get('dirty') else ''}, "
                f"torch {v.get('torch')}, transformers {v.get('transformers')}, quantbench {v.get('quantbench')}; "
                f"{hw.get('cpu')} ({hw.get('cores')} cores), GPU {hw.get('gpu')}, threads {env.get('threads')}."
            )
    return "\n".join(lines)


def _hist(h: dict[str, Any]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in h.items() if v)


def method_details(run_dirs: Iterable[str | Path], records: list[dict[str, Any]] | None = None) -> str:
    """Per-cell method choices from the cells' artifacts.json: llama.cpp per-tensor type histograms,
    mixed-precision bit allocations, KV protocol and calculator bytes; each beside its bits/weight."""
    bpw = {r["cell"]: r["value"] for r in (records or [])
           if r.get("metric") == "bits_per_weight" and r.get("status") == "ok"}
    kvb = {r["cell"]: (r["value"], r["protocol"]["calc_bytes_per_token"], r["protocol"].get("prefill_tokens"))
           for r in (records or []) if r.get("metric") == "kv_bytes_per_token" and r.get("status") == "ok"
           and isinstance(r.get("protocol"), dict) and "calc_bytes_per_token" in r["protocol"]}
    lines: list[str] = []
    for d in run_dirs:
        for path in sorted(Path(d).glob("cells/*/*/artifacts.json")):
            try:
                arts = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cell, model = path.parent.name, path.parent.parent.name
            b = bpw.get(cell)
            tag = f"`{cell}` ({model}{'' if b is None else f', {b:.3f} bits/w'})"
            for name, a in arts.items():
                if "type_histogram" in a:
                    im = " with imatrix" if a.get("imatrix") else ""
                    lines.append(f"- {tag}: {name}{im} tensor types {_hist(a['type_histogram'])}")
                elif "bits_histogram" in a:
                    gh = a.get("group_histogram")
                    lines.append(f"- {tag}: {name} bits {_hist(a['bits_histogram'])}"
                                 + (f", groups {_hist(gh)}" if gh else "")
                                 + f"; target {a.get('target_bpw')} bpw, achieved {a.get('achieved_bpw', 0):.4f}"
                                 + f" (sensitivity: {a.get('sensitivity')})")
                elif "calc_bytes_per_token" in a and cell in kvb:
                    meas, calc, n = kvb[cell]
                    lines.append(f"- {tag}: {name} KV protocol {a.get('protocol')}; real cache {meas:.1f} B/token "
                                 f"after {n} tokens, calculator {calc:.1f} at the same length")
                elif "calc_bytes_per_token" in a:
                    lines.append(f"- {tag}: {name} KV protocol {a.get('protocol')}, calculator "
                                 f"{a['calc_bytes_per_token']:.1f} B/token (fp16 scales, outliers, fp windows)")
    return ("### Method details\n\n" + "\n".join(lines) + "\n") if lines else ""


def kv_scaling_rows(records: list[dict[str, Any]], tokens: int = 131072) -> list[dict[str, Any]]:
    """What each KV cell's configuration gives for Llama-3-70B (L=80, H_kv=8, d_h=128) at ``tokens``
    tokens, batch 1 (the calculator, :mod:`quantbench.methods.kvcalc`), with the fp16 cache first."""
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        cfgs = r.get("method_config")
        for c in cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(c, dict) and quantizes_kv(c.get("method")) and r["cell"] not in seen:
                seen[r["cell"]] = {k: v for k, v in c.items() if k not in ("method", "version")} | {
                    "_method": c["method"]}
    if not seen:
        return []
    rows: list[tuple[str, str, dict[str, Any]]] = [("fp16 cache", "kv-fp16", {})]
    rows += [(cell, p.pop("_method"), p) for cell, p in seen.items()]
    elems = 2 * LLAMA3_70B["n_layers"] * LLAMA3_70B["n_kv_heads"] * LLAMA3_70B["head_dim"] * tokens
    out = []
    for cell, method, params in rows:
        b = kv_cache_bytes(method, params, tokens=tokens, **LLAMA3_70B)["total"]
        out.append({"cell": cell, "method": method, "GB": b / 1e9, "bits_per_element": 8 * b / elems})
    return out


def kv_scaling_markdown(records: list[dict[str, Any]]) -> str:
    rows = kv_scaling_rows(records)
    if not rows:
        return ""
    lines = ["### KV cache for Llama-3-70B at 128k tokens (calculator)", "",
             "L=80, H_kv=8, d_h=128, T=131072, batch 1; each KV cell's configuration with its overheads "
             "(scales, outliers, fp16 sink/window, calibrated state).", "",
             "| cell | method | GB | bits/element |", "|---|---|---:|---:|"]
    lines += [f"| {r['cell']} | {r['method']} | {r['GB']:.2f} | {r['bits_per_element']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write leaderboard.md into ``out_dir`` (default: the first run dir) and return its path."""
    recs = load_runs(run_dirs)
    first = Path(run_dirs[0])
    out = Path(out_dir) if out_dir else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    title = "quantbench leaderboard"
    md = markdown(recs, title) + "\n" + method_details(run_dirs, recs) + "\n" + kv_scaling_markdown(recs)
    md += "\n" + provenance_footer(run_dirs) + "\n"
    path = out / "leaderboard.md"
    path.write_text(md)
    return path
