"""Leaderboards from records: pandas tables, one row per cell, a column per metric (and protocol).

Every fact about a metric (column label, position, display scale and number format, protocol tag)
comes from its registered spec (:data:`quantbench.harness.measure.METRICS`); whether a method
quantizes the KV cache from its registered class (``Method.quantizes("kv")``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ...methods.base import METHODS, ConfigError
from ...methods.kvcalc import LLAMA3_70B, kv_cache_bytes
from ..measure import METRICS, MetricSpec

log = logging.getLogger(__name__)

ID_COLUMNS = ("suite", "model", "cell", "method")
STATUSES = ("ok", "failed", "unavailable")


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


# --------------------------------------------------------------------------- reading records (fail closed)
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if _is_num(v) else type(v).__name__)


def record_problem(r: Any) -> str | None:
    """What is wrong with one parsed JSONL line as a record (None: a usable record).

    The checks are what reports and compare rely on: every key :func:`make_record` writes, the
    identifying fields as strings, ``model.name``, ``value``/``stderr`` numbers or null, ``status`` one of
    :data:`STATUSES`, ``protocol``/``provenance`` (and its ``hardware``/``versions``) objects."""
    if not isinstance(r, dict):
        return f"expected a JSON object, got {_kind(r)}"
    missing = [k for k in RECORD_KEYS if k not in r]
    if missing:
        return f"record lacks {', '.join(repr(k) for k in missing)}"
    for k in ("run_id", "suite", "cell", "method", "metric"):
        if not isinstance(r[k], str) or not r[k]:
            return f"'{k}' must be a non-empty string, got {_kind(r[k])}"
    if not isinstance(r["model"], dict) or not isinstance(r["model"].get("name"), str) or not r["model"]["name"]:
        return "'model' must be an object with a non-empty string 'name'"
    for k in ("value", "stderr"):
        if r[k] is not None and not _is_num(r[k]):
            return f"'{k}' must be a number or null, got {_kind(r[k])} {json.dumps(r[k])[:40]}"
    if r["status"] not in STATUSES:
        return f"'status' must be one of {', '.join(STATUSES)}, got {json.dumps(r['status'])[:40]}"
    if r["higher_is_better"] is not None and not isinstance(r["higher_is_better"], bool):
        return f"'higher_is_better' must be true, false or null, got {_kind(r['higher_is_better'])}"
    for k in ("unit", "error"):
        if r[k] is not None and not isinstance(r[k], str):
            return f"'{k}' must be a string or null, got {_kind(r[k])}"
    for k in ("protocol", "provenance"):
        if r[k] is not None and not isinstance(r[k], dict):
            return f"'{k}' must be an object or null, got {_kind(r[k])}"
    for k in ("hardware", "versions"):
        v = (r["provenance"] or {}).get(k)
        if v is not None and not isinstance(v, dict):
            return f"'provenance.{k}' must be an object or null, got {_kind(v)}"
    return None


RECORD_KEYS = ("schema", "run_id", "suite", "cell", "model", "method", "method_config", "metric", "value", "unit",
               "higher_is_better", "protocol", "stderr", "status", "error", "provenance")
_torn_warned: set[tuple[str, int, int]] = set()


def load_records(path: str | Path, *, torn_tail: bool = False, what: str = "records") -> list[dict[str, Any]]:
    """Every record of a JSONL file, checked; a file that cannot be read whole is a :class:`ConfigError`
    naming the file and line (a user error: exit 2), never a silently shorter list.

    ``torn_tail``: an unterminated last line that does not parse (a run killed mid-write) is skipped with a
    warning instead (a run's records; a baseline must be whole).  An empty file is an error."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a {what} .jsonl file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    lines = data.split(b"\n")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(lines, 1):
        torn_ok = torn_tail and i == len(lines)  # the unterminated remainder after the last newline
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn_ok:
                _warn_torn(p, i, data)
                continue
            raise ConfigError(f"{p}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        text = text.strip()
        if not text:
            continue
        try:
            r = json.loads(text)
        except json.JSONDecodeError as e:
            if torn_ok:
                _warn_torn(p, i, data)
                continue
            tail = " (an incomplete last line: a torn write)" if i == len(lines) else ""
            raise ConfigError(f"{p}:{i}: not a JSON record: {e.msg} at column {e.colno}{tail}") from None
        problem = record_problem(r)
        if problem:
            raise ConfigError(f"{p}:{i}: {problem}")
        out.append(r)
    if not out:
        raise ConfigError(f"{p}: no {what} in the file")
    return out


def _warn_torn(p: Path, line: int, data: bytes) -> None:
    key = (str(p.resolve()), line, len(data))
    if key not in _torn_warned:  # one warning per file state, however often a report reads it
        _torn_warned.add(key)
        log.warning("%s:%d: skipped an incomplete last line (a run killed mid-write)", p, line)


def run_records_path(spec: str | Path) -> Path:
    """The records file of a run directory, or ``spec`` itself (a records/baseline .jsonl file)."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "records.jsonl").is_file():
            raise ConfigError(f"{p}: not a run directory (no records.jsonl)")
        return p / "records.jsonl"
    if not p.exists():
        raise ConfigError(f"{p}: no such run directory or records file")
    return p


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The records of run directories or records/baseline .jsonl files (a torn last line of a run is
    skipped with a warning; anything else unreadable is a :class:`ConfigError` naming file and line)."""
    recs: list[dict[str, Any]] = []
    for d in run_dirs:
        p = Path(d)
        if p.is_dir() and not (p / "records.jsonl").exists():
            continue  # a run that has recorded nothing yet (``report`` refuses it up front)
        recs.extend(load_records(run_records_path(p), torn_tail=True))
    return recs


def read_env(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's env.json (None when there is none); a malformed one is a :class:`ConfigError`."""
    p = Path(run_dir) / "env.json"
    if not p.is_file():
        return None
    try:
        env = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: not valid JSON: {e.msg} at column {e.colno}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    if not isinstance(env, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {_kind(env)}")
    for k in ("versions", "hardware"):
        if env.get(k) is not None and not isinstance(env[k], dict):
            raise ConfigError(f"{p}: '{k}' must be an object, got {_kind(env[k])}")
    return env


# --------------------------------------------------------------------------- Markdown text
_MD_ESCAPES = {"\\": "\\\\", "|": "\\|", "`": "\\`", "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(v: Any) -> str:
    """``v`` as literal text in a Markdown table cell, heading or list item: ``|``, backticks, backslashes
    and HTML (``< > &``) escaped, line breaks (and other control characters) made spaces."""
    s = "".join(_MD_ESCAPES.get(ch, ch) for ch in str(v))
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", s)


def md_code(v: Any, *, table: bool = False) -> str:
    """``v`` as a Markdown code span (literal: no HTML, no emphasis); ``table``: inside a table cell
    (``|`` escaped, which GFM undoes there)."""
    s = re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", str(v))
    if table:
        s = s.replace("|", "\\|")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) else ""
    return f"{fence}{pad}{s}{pad}{fence}"


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
        lines += [f"## {md_text(suite)} — {md_text(model)}", ""]
        header = ["cell"] + metric_cols + derived + ["status"]
        lines.append("| " + " | ".join(md_text(h) for h in header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|")
        for _, row in g.iterrows():
            cells = [row["cell"]] + [_fmt(row[c], c) for c in metric_cols]
            cells += [_fmt_derived(row[c], c) for c in derived]
            cells.append(row["status"])
            lines.append("| " + " | ".join(md_text(c) for c in cells) + " |")
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
            lines.append(f"- {md_code(r['cell'])} {md_text(r['metric'])}: {md_text(r['status'])} — "
                         f"{md_text(r['error'])}")
        lines.append("")
    return "\n".join(lines)


def run_env(run_dir: str | Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run-level provenance: the run's env.json, else (a records/baseline file, a run without env.json)
    the first record's provenance (``records``, else read from ``run_dir``)."""
    env = read_env(run_dir) if Path(run_dir).is_dir() else None
    if env is None:
        recs = load_runs([run_dir]) if records is None else records
        env = next((r["provenance"] for r in recs if r.get("provenance")), {})
    return env


def provenance_footer(run_dirs: Iterable[str | Path]) -> str:
    lines = []
    for d in run_dirs:
        env = run_env(d)
        if env:
            v = env.get("versions") or {}
            hw = env.get("hardware") or {}
            t = md_text
            lines.append(
                f"Run {md_code(Path(d).name)}: git {t(str(env.get('git_sha'))[:10])}"
                f"{' (dirty)' if env.get('dirty') else ''}, torch {t(v.get('torch'))}, "
                f"transformers {t(v.get('transformers'))}, quantbench {t(v.get('quantbench'))}; "
                f"{t(hw.get('cpu'))} ({t(hw.get('cores'))} cores), GPU {t(hw.get('gpu'))}, "
                f"threads {t(env.get('threads'))}."
            )
    return "\n".join(lines)


def _hist(h: dict[str, Any]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in h.items() if v)


def method_details(run_dirs: Iterable[str | Path], records: list[dict[str, Any]] | None = None) -> str:
    """Per-cell method choices from the cells' artifacts.json: llama.cpp per-tensor type histograms,
    mixed-precision bit allocations, KV protocol and calculator bytes; each beside its bits/weight."""
    lines = [f"- {md_code(cell)} ({md_text(model)}{'' if b is None else f', {b:.3f} bits/w'}): {md_text(text)}"
             for cell, model, b, text in method_detail_items(run_dirs, records)]
    return ("### Method details\n\n" + "\n".join(lines) + "\n") if lines else ""


def method_detail_items(run_dirs: Iterable[str | Path], records: list[dict[str, Any]] | None = None
                        ) -> list[tuple[str, str, float | None, str]]:
    """:func:`method_details` as plain text: (cell, model, bits/weight or None, detail) per line."""
    bpw = {r["cell"]: r["value"] for r in (records or [])
           if r.get("metric") == "bits_per_weight" and r.get("status") == "ok"}
    kvb = {r["cell"]: (r["value"], r["protocol"]["calc_bytes_per_token"], r["protocol"].get("prefill_tokens"))
           for r in (records or []) if r.get("metric") == "kv_bytes_per_token" and r.get("status") == "ok"
           and isinstance(r.get("protocol"), dict) and _is_num(r["protocol"].get("calc_bytes_per_token"))
           and _is_num(r.get("value"))}
    items: list[tuple[str, str, float | None, str]] = []
    for d in run_dirs:
        for path in sorted(Path(d).glob("cells/*/*/artifacts.json")):
            try:
                arts = json.loads(path.read_bytes().decode("utf-8"))
            except (OSError, ValueError):  # a cell's side file: a report never fails on it
                log.warning("skipping %s: not readable JSON", path)
                continue
            cell, model = path.parent.name, path.parent.parent.name
            b = bpw.get(cell)
            for name, a in arts.items() if isinstance(arts, dict) else ():
                if not isinstance(a, dict):
                    continue
                text = ""
                if isinstance(a.get("type_histogram"), dict):
                    im = " with imatrix" if a.get("imatrix") else ""
                    text = f"{name}{im} tensor types {_hist(a['type_histogram'])}"
                elif isinstance(a.get("bits_histogram"), dict):
                    gh = a.get("group_histogram")
                    ach = a.get("achieved_bpw", 0)
                    groups = f", groups {_hist(gh)}" if isinstance(gh, dict) and gh else ""
                    text = (f"{name} bits {_hist(a['bits_histogram'])}{groups}"
                            + f"; target {a.get('target_bpw')} bpw, achieved "
                            + (f"{ach:.4f}" if _is_num(ach) else str(ach))
                            + f" (sensitivity: {a.get('sensitivity')})")
                elif "calc_bytes_per_token" in a and cell in kvb:
                    meas, calc, n = kvb[cell]
                    text = (f"{name} KV protocol {a.get('protocol')}; real cache {meas:.1f} B/token "
                            f"after {n} tokens, calculator {calc:.1f} at the same length")
                elif _is_num(a.get("calc_bytes_per_token")):
                    text = (f"{name} KV protocol {a.get('protocol')}, calculator "
                            f"{a['calc_bytes_per_token']:.1f} B/token (fp16 scales, outliers, fp windows)")
                if text:
                    items.append((cell, model, b if _is_num(b) else None, text))
    return items


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
    lines += [f"| {md_text(r['cell'])} | {md_text(r['method'])} | {r['GB']:.2f} | {r['bits_per_element']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write leaderboard.md into ``out_dir`` (default: the first run dir) and return its path."""
    recs = load_runs(run_dirs)  # every input read (and checked) before anything is written
    first = Path(run_dirs[0])
    out = Path(out_dir) if out_dir else (first if first.is_dir() else first.parent)
    title = "quantbench leaderboard"
    md = markdown(recs, title) + "\n" + method_details(run_dirs, recs) + "\n" + kv_scaling_markdown(recs)
    md += "\n" + provenance_footer(run_dirs) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "leaderboard.md"
    path.write_text(md, encoding="utf-8")
    return path
