"""Leaderboards from records: pandas tables, one row per cell, a column per metric (and protocol).

Every fact about a metric (column label, position, display scale and number format, protocol tag)
comes from its registered spec (:data:`quantbench.harness.measure.METRICS`); whether a method
quantizes the KV cache from its registered class (``Method.quantizes("kv")``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

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
def _is_num(v: Any) -> TypeGuard[int | float]:
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
    """The leaderboard as Markdown: one table per (suite, model), columns grouped quality | size | speed |
    tasks with short headers, each value with its uncertainty, a legend (protocols, markers) under each
    table and the metrics not measured summarised once per reason (see :func:`board`)."""
    sections = board(records)
    if not sections:
        return "(no records)\n"
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    for sec in sections:
        lines += [f"## {md_text(sec.suite)} — {md_text(sec.model)}", ""]
        if sec.baseline_label:
            lines += [f"Baseline: {md_text(sec.baseline_label)}.", ""]
        status = any(r.status != "ok" for r in sec.rows)
        header = ["cell"] + [c.header for c in sec.columns] + (["status"] if status else [])
        lines.append("| " + " | ".join(md_text(h) for h in header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(sec.columns) + (["---"] if status else [])) + "|")
        for row in sec.rows:
            cells = [md_text(row.label + row.marks)]
            for c in sec.columns:
                v = row.values[c.key]
                cells.append(f"**{md_text(v.text)}**" if v.tone else md_text(v.text))
            if status:
                cells.append(md_text(row.status))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"- {md_legend(item)}" for item in sec.legend] + [""]
    nm = not_measured(records)
    if nm:
        lines += ["### Not measured", ""] + [f"- {md_legend(item)}" for item in nm] + [""]
    return "\n".join(lines)


def md_legend(item: tuple[str, str]) -> str:
    """A legend item (a term, its text) as Markdown: the term bold, both escaped."""
    head, text = item
    return (f"**{md_text(head)}**: " if head else "") + md_text(text)


# --------------------------------------------------------------------------- the grouped, uncertainty-aware view
GROUPS = ("quality", "size", "speed", "tasks", "other")
GROUP_OF = {
    "perplexity": "quality", "ln_ppl_ratio": "quality", "kl_divergence": "quality", "kl_median": "quality",
    "kl_p90": "quality", "kl_p99": "quality", "kl_p999": "quality", "kl_max": "quality", "rms_delta_p": "quality",
    "delta_p_p01": "quality", "delta_p_p99": "quality", "same_top_p": "quality", "top1_agreement": "quality",
    "bits_per_weight": "size", "weight_bytes": "size", "kv_bytes_per_token": "size", "peak_memory_bytes": "size",
    "quantize_seconds": "speed", "prefill_tokens_per_s": "speed", "decode_ms_per_token": "speed",
    "energy_j_per_token": "speed", "accuracy": "tasks",
}
#: the metrics the tables show (the data files hold every metric); in this order within a group
SHOWN = ("perplexity", "kl_divergence", "kl_p99", "top1_agreement", "bits_per_weight", "weight_bytes",
         "kv_bytes_per_token", "peak_memory_bytes", "quantize_seconds", "prefill_tokens_per_s",
         "decode_ms_per_token", "energy_j_per_token", "accuracy")
#: short table headers of the per-token metrics vs the reference (their registered labels are longer)
EXTRA_LABELS = {"kl_median": "KL p50", "kl_p90": "KL p90", "kl_p99": "KL p99", "kl_p999": "KL p99.9",
                "kl_max": "KL max", "rms_delta_p": "RMS Δp", "delta_p_p01": "Δp p1", "delta_p_p99": "Δp p99",
                "same_top_p": "same top", "ln_ppl_ratio": "ln ppl ratio"}
FAMILIES = ("baseline", "weight", "activation", "kv")
FAMILY_TITLES = {"baseline": "baseline", "weight": "weight-only", "activation": "weights + activations",
                 "kv": "KV cache"}
NOISE_SIGMAS = 2.0  # a difference is "beyond noise" when |Δ| > NOISE_SIGMAS x its stderr
_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
#: weight grids of GGUF source formats a cell's grid can contain (see :func:`holds_source_grid`)
SOURCE_GRIDS = {"GGUF Q4_1": {"block": 32, "levels": 15, "asym": True}}
MARK_NOISY, MARK_INDEP, MARK_GRID, MARK_REF = "~", "†", "§", "‡"


def short_label(metric: str) -> str:
    """A metric's table header: the short forms of :data:`EXTRA_LABELS` first, else its registered label."""
    if metric in EXTRA_LABELS:
        return EXTRA_LABELS[metric]
    spec = spec_of(metric)
    return spec.label if spec else metric


def chain(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The method configs of a record's cell (a chain or one config)."""
    mc = rec.get("method_config")
    if isinstance(mc, list):
        return [c for c in mc if isinstance(c, dict)]
    return [mc] if isinstance(mc, dict) else []


def family(rec: dict[str, Any]) -> str:
    """The method family of a record's cell: "baseline" (nothing quantized), "kv" (a method of the chain
    quantizes the KV cache), "activation" (one quantizes activations) or "weight" (weight-only); asked of the
    registered classes (``Method.quantizes``), never of method names."""
    names = [c.get("method") for c in chain(rec)] or [rec.get("method")]
    names = [n for n in names if n != "fp"]
    if not names:
        return "baseline"
    classes = [METHODS.get(n) for n in names if isinstance(n, str) and n in METHODS]
    if any(c.quantizes("kv") for c in classes):
        return "kv"
    if any(c.quantizes("activations") for c in classes):
        return "activation"
    return "weight"


def baseline_label(rec: dict[str, Any]) -> str:
    """What the unquantized row really is: its dtype and the precision of the weights it was loaded from
    (``model.source_precision``), e.g. "fp32 (dequantized from GGUF Q4_1)"; the cell name when unknown."""
    model = rec.get("model") or {}
    dtype = next((c.get("dtype") for c in chain(rec) if isinstance(c.get("dtype"), str)), None)
    if dtype in (None, "float32") and isinstance(model.get("dtype"), str):
        dtype = model["dtype"]  # fp's default (float32) leaves the model as loaded: a bf16 run's fp row is bf16
    if not isinstance(dtype, str):
        return str(rec["cell"])
    short = _DTYPE_SHORT.get(dtype, dtype)
    src = model.get("source_precision")
    if not isinstance(src, str) or not src.strip():
        return short
    head, _, note = src.strip().partition(" ")
    if head in _DTYPE_SHORT or head in _DTYPE_SHORT.values():  # a float source, maybe with a note: "float32 (random)"
        same = _DTYPE_SHORT.get(head, head) == short
        return (short if same else f"{short} (converted from {_DTYPE_SHORT.get(head, head)})") + (
            f" {note}" if note else "")
    return f"{short} (dequantized from {src})"


def holds_source_grid(rec: dict[str, Any]) -> bool:
    """Whether the cell's weight grid contains the grid its source weights were stored on, so that it can
    reproduce the (dequantized) source weights exactly and its error vs the baseline says nothing of the method.

    The rule, for a GGUF Q4_1 source (asymmetric 4-bit: per block of 32 input columns a scale d = (max-min)/15
    and a min m, so every block's values are m + d*q, q = 0..15, spanning its full code range): a method of the
    chain that is ``rtn`` or ``gptq`` (``gptq`` without act-order, or with static groups, so that its groups
    are column blocks), asymmetric (``sym: false``), with ``group_size`` 32 (groups aligned with the source's
    blocks) and ``bits`` b with 2^b - 1 a multiple of 15 (b = 4, 8, ...: the block's own min/max grid then
    has the source levels among its own).  Coarser groups (64, 128, per channel) do not contain it: one scale
    cannot hold two source blocks' different scales.  Other source formats are not marked."""
    grid = SOURCE_GRIDS.get(str((rec.get("model") or {}).get("source_precision")))
    if grid is None:
        return False
    for c in chain(rec):
        m, bits = c.get("method"), c.get("bits")
        if m not in ("rtn", "gptq") or not _is_num(bits) or c.get("sym") is not False:
            continue
        if m == "gptq" and c.get("act_order") and not c.get("static_groups"):
            continue
        if c.get("group_size") == grid["block"] and int(bits) == bits and (2 ** int(bits) - 1) % grid["levels"] == 0:
            return True
    return False


def is_reference_path(rec: dict[str, Any]) -> bool:
    """Whether a latency record timed quantbench's reference forward of the format (protocol ``reference_path``)."""
    return bool((rec.get("protocol") or {}).get("reference_path"))


def is_noisy(rec: dict[str, Any]) -> bool:
    """Whether the record says its measurement was disturbed (``noisy`` in its protocol or provenance)."""
    return bool((rec.get("protocol") or {}).get("noisy")) or bool((rec.get("provenance") or {}).get("noisy"))


def compact(v: float | None, fmt: str | None = None) -> str:
    """A number for a table: large values compact (74.4k, 1.28e8), else ``fmt`` or about 4 significant digits."""
    if v is None or not math.isfinite(v):
        return "—" if v is None else str(v)
    if v == 0:
        v = 0.0  # never "-0.000"
    a = abs(v)
    if a >= 1e6:
        m, e = f"{v:.2e}".split("e")
        return f"{m}e{int(e)}"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if fmt:
        t = format(v, fmt)
        return t[1:] if re.fullmatch(r"-0\.?0*", t) else t  # a tiny negative shown as 0, unsigned
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3f}"
    return f"{v:.2g}"


def _signed(v: float, fmt: str | None = None) -> str:
    t = compact(v, fmt)
    return t if t.startswith("-") else "+" + t


@dataclass
class Val:
    """One shown value: the number (sortable), its text, its uncertainty and a tone (beyond noise)."""

    value: float | None
    text: str = "—"
    stderr: float | None = None
    tone: str = ""  # "good" / "bad": beyond NOISE_SIGMAS stderrs (Δ and recovery only)
    paired: bool | None = None


@dataclass
class Column:
    key: str  # unique in its table
    header: str  # short header
    group: str
    metric: str
    tag: str
    kind: str  # value | linear | other | delta | recovery


@dataclass
class BoardRow:
    cell: str
    method: str
    family: str
    label: str  # the cell name, or the baseline's real precision
    marks: str  # MARK_GRID ...
    status: str
    bits: float | None
    values: dict[str, Val]


@dataclass
class Section:
    suite: str
    model: str
    baseline_label: str | None
    columns: list[Column]
    rows: list[BoardRow]
    legend: list[tuple[str, str]]


def paired_recovery(q: dict[str, Any], f: dict[str, Any]) -> tuple[float, float | None, bool]:
    """Accuracy recovery q/f and its stderr: paired over the same examples (the records' ``samples``: the
    ratio estimator's linearisation z_i = (q_i - R f_i) / mean(f)) when both have samples of one length,
    else from the two stderrs as independent errors; returns (recovery, stderr or None, paired)."""
    qv, fv = float(q["value"]), float(f["value"])
    r = qv / fv if fv else float("nan")
    qs, fs = q.get("samples"), f.get("samples")
    if (isinstance(qs, list) and isinstance(fs, list) and len(qs) == len(fs) > 1 and fv
            and all(_is_num(x) for x in qs + fs)):
        n = len(qs)
        fbar = sum(fs) / n
        if fbar:
            z = [(a - r * b) / fbar for a, b in zip(qs, fs)]
            zbar = sum(z) / n
            var = sum((x - zbar) ** 2 for x in z) / (n - 1)
            return r, math.sqrt(var / n), True
    sq, sf = q.get("stderr"), f.get("stderr")
    if _is_num(sq) and _is_num(sf) and fv:
        rel = (sq / qv) ** 2 if qv else 0.0
        se = math.sqrt(r * r * (rel + (sf / fv) ** 2)) if qv else sq / fv
        return r, se, False
    return r, None, False


def paired_delta_ppl(q: dict[str, Any], f: dict[str, Any], ratio: dict[str, Any] | None
                     ) -> tuple[float, float | None, bool]:
    """Δppl = ppl - ppl_baseline and its stderr: paired from the cell's ``ln_ppl_ratio`` record (mean per-token
    NLL difference vs the reference on the same tokens; Δppl's stderr = ppl x that stderr, the delta method)
    when present, else the two perplexity stderrs as independent errors; returns (Δ, stderr or None, paired)."""
    d = float(q["value"]) - float(f["value"])
    if ratio is not None and ratio.get("status") == "ok" and _is_num(ratio.get("stderr")):
        return d, float(q["value"]) * float(ratio["stderr"]), True
    sq, sf = q.get("stderr"), f.get("stderr")
    if _is_num(sq) and _is_num(sf):
        return d, math.hypot(sq, sf), False
    return d, None, False


def _tone(diff: float, se: float | None, higher_is_better: bool) -> str:
    if se is None or not math.isfinite(diff) or abs(diff) <= NOISE_SIGMAS * se:
        return ""
    return "good" if (diff > 0) == higher_is_better else "bad"


def _latency_range(r: dict[str, Any], scale: float) -> tuple[float | None, float | None]:
    """(p10, p90) of a latency record's protocol (decode step times), when recorded."""
    p = r.get("protocol") or {}
    if r["metric"] != "decode_ms_per_token":
        return None, None
    lo, hi = p.get("decode_ms_p10"), p.get("decode_ms_p90")
    return (lo * scale if _is_num(lo) else None), (hi * scale if _is_num(hi) else None)


def _value(r: dict[str, Any] | None) -> Val:
    if r is None or r["status"] != "ok" or not _is_num(r["value"]):
        return Val(None)
    spec = spec_of(r["metric"])
    scale, fmt = (spec.scale, spec.fmt) if spec else (1.0, None)
    v = float(r["value"]) * scale
    text = compact(v, fmt)
    se = float(r["stderr"]) * scale if _is_num(r.get("stderr")) else None
    if se is not None:
        text += f" ± {compact(se, fmt if se == 0 or abs(se) >= 0.01 else None)}"
    lo, hi = _latency_range(r, scale)
    if lo is not None and hi is not None:
        text += f" ({compact(lo)}–{compact(hi)})"
    elif hi is not None:
        text += f" (p90 {compact(hi)})"
    if is_noisy(r):
        text = MARK_NOISY + text
    if is_reference_path(r):
        text = MARK_REF + text
    return Val(v, text, se)


_PROTO_SKIP = {"noisy", "noisy_reasons", "kernel_paths", "reference_path",
               "text_sha256", "prefill_s", "decode_ms_p50", "decode_ms_p90", "decode_ms_p10",
               "prefill_tokens_per_s", "decode_steps", "weight_bytes", "kv_bytes_read_per_step", "achieved_gb_s",
               "roofline_pct", "load1_before", "load1_after", "other_processes_cpu_cores", "memory_bandwidth_gb_s",
               "packed_weights", "scales_zeros", "outliers", "unquantized", "linear_total", "other_total",
               "linear_weights", "whole_model", "quantized_only", "static_bytes", "calc_bytes_per_token",
               "phases", "quantize_detail", "eval_detail", "components", "lm_eval_metric", "task_version"}


def _proto_items(p: dict[str, Any]) -> list[tuple[str, str]]:
    """The facts of a protocol worth a legend line: scalars (not flags), measurements left out."""
    return [(k, str(v)) for k, v in p.items()
            if k not in _PROTO_SKIP and isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != ""]


def _proto_text(p: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in _proto_items(p))


def _section(suite: str, model: str, recs: list[dict[str, Any]]) -> Section:
    order = list(dict.fromkeys(r["cell"] for r in recs))
    by_cell: dict[str, dict[tuple[str, str], dict[str, Any]]] = {c: {} for c in order}
    for r in recs:
        by_cell[r["cell"]][(r["metric"], protocol_tag(r))] = r
    first = {c: next(r for r in recs if r["cell"] == c) for c in order}
    base_cell = next((c for c in order if first[c]["method"] == "fp"), None) or ("fp" if "fp" in order else None)
    base = by_cell.get(base_cell, {}) if base_cell else {}
    # columns: metric x protocol with at least one ok value, grouped, in the registered order
    present: dict[tuple[str, str], dict[str, Any]] = {}
    for r in recs:
        if r["status"] == "ok" and r["metric"] in SHOWN:
            present.setdefault((r["metric"], protocol_tag(r)), r)

    def eval_index(mk: tuple[str, str]) -> int:
        """0 for the primary eval's perplexity, i for the i-th further eval dataset's (suite ``eval:`` list)."""
        i = (present[mk].get("protocol") or {}).get("eval_index", 0) if mk[0] == "perplexity" else 0
        return i if isinstance(i, int) and not isinstance(i, bool) else 0

    def key(mk: tuple[str, str]) -> tuple[Any, ...]:
        metric, tag = mk
        return (GROUPS.index(GROUP_OF.get(metric, "other")), SHOWN.index(metric), eval_index(mk), _natural(tag))

    # perplexity on several eval datasets (an ``eval:`` list): "ppl <dataset>" / "Δppl <dataset>" headers
    ppl_sets = {str((present[mk].get("protocol") or {}).get("dataset")) for mk in present if mk[0] == "perplexity"}
    by_dataset = len(ppl_sets) > 1

    cols: list[Column] = []
    for mk in sorted(present, key=key):
        metric, tag = mk
        group = GROUP_OF.get(metric, "other")
        label = short_label(metric)
        if metric == "weight_bytes" and any(
                _is_num((c.get(mk) or {}).get("protocol", {}).get("linear_total")) for c in by_cell.values()):
            cols.append(Column(f"{metric}:linear [{tag}]", "linear MB", group, metric, tag, "linear"))
            cols.append(Column(f"{metric}:other [{tag}]", "other MB", group, metric, tag, "other"))
            continue
        if metric == "accuracy":
            task = str((present[mk].get("protocol") or {}).get("task", tag))
            cols.append(Column(f"{metric} [{tag}]", task, group, metric, tag, "value"))
            if (base.get(mk) or {}).get("status") == "ok":
                cols.append(Column(f"recovery [{tag}]", "rec", group, metric, tag, "recovery"))
            continue
        ds = f" {(present[mk].get('protocol') or {}).get('dataset')}" if metric == "perplexity" and by_dataset else ""
        cols.append(Column(f"{metric} [{tag}]", label + ds, group, metric, tag, "value"))
        if metric == "perplexity" and (base.get(mk) or {}).get("status") == "ok":
            cols.append(Column(f"delta [{tag}]", "Δppl" + ds, group, metric, tag, "delta"))
    # a header shown twice in a table (one metric under two protocols) carries its tag
    counts: dict[str, int] = {}
    for c in cols:
        counts[c.header] = counts.get(c.header, 0) + 1
    for c in cols:
        if counts[c.header] > 1 and c.kind != "recovery":
            c.header = f"{c.header} [{c.tag}]"
    rows: list[BoardRow] = []
    blabel = baseline_label(first[base_cell]) if base_cell else None
    for cname in order:
        cell_recs = by_cell[cname]
        r0 = first[cname]
        fam = family(r0)
        values: dict[str, Val] = {}
        for c in cols:
            mk = (c.metric, c.tag)
            cr = cell_recs.get(mk)
            b = base.get(mk)
            ok = cr is not None and cr["status"] == "ok" and _is_num(cr["value"])
            if c.kind == "value":
                values[c.key] = _value(cr)
            elif c.kind in ("linear", "other"):
                p = (cr or {}).get("protocol") or {}
                v = p.get(f"{c.kind}_total")
                values[c.key] = Val(v * 1e-6, compact(v * 1e-6)) if ok and _is_num(v) else Val(None)
            elif not ok or b is None or not _is_num(b.get("value")):
                values[c.key] = Val(None)
            elif cname == base_cell:
                values[c.key] = Val(0.0 if c.kind == "delta" else 1.0, "ref")
            elif c.kind == "delta":
                # the paired stderr comes from the ln_ppl_ratio on the same text only (a further eval dataset
                # has none: its Δppl stderr is from the two independent stderrs)
                ratio = cell_recs.get(("ln_ppl_ratio", c.tag)) or next(
                    (x for (m, _), x in cell_recs.items() if m == "ln_ppl_ratio" and (x.get("protocol") or {}).get(
                        "dataset") == (cr.get("protocol") or {}).get("dataset")), None)  # type: ignore[union-attr]
                d, se, paired = paired_delta_ppl(cr, b, ratio)  # type: ignore[arg-type]
                text = _signed(d) + (f" ± {compact(se)}" if se is not None else "") + (
                    MARK_INDEP if se is not None and not paired else "")
                values[c.key] = Val(d, text, se, _tone(d, se, False), paired)
            else:
                rv, se, paired = paired_recovery(cr, b)  # type: ignore[arg-type]
                text = compact(rv, ".3f") + (f" ± {compact(se, '.3f')}" if se is not None else "") + (
                    MARK_INDEP if se is not None and not paired else "")
                values[c.key] = Val(rv, text, se, _tone(rv - 1.0, se, True), paired)
        statuses = [r["status"] for r in cell_recs.values()]
        st = "ok" if all(s in ("ok", "unavailable") for s in statuses) else (
            "failed" if "failed" in statuses else "partial")
        bits = next((float(r["value"]) for (m, _), r in cell_recs.items()
                     if m == "bits_per_weight" and r["status"] == "ok" and _is_num(r["value"])), None)
        label = blabel if cname == base_cell and blabel else cname
        rows.append(BoardRow(cname, str(r0["method"]), fam, label, MARK_GRID if holds_source_grid(r0) else "",
                             st, bits, values))
    return Section(suite, model, blabel, cols, rows, _legend(cols, present, recs, rows))


def _legend(cols: list[Column], present: dict[tuple[str, str], dict[str, Any]], recs: list[dict[str, Any]],
            rows: list[BoardRow]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for g in GROUPS:
        gcols = [c for c in cols if c.group == g]
        if not gcols:
            continue
        vcols = [c for c in gcols if c.kind in ("value", "linear")]
        protos = [{k: v for k, v in (present[(c.metric, c.tag)].get("protocol") or {}).items()} for c in vcols]
        common = {k: v for k, v in protos[0].items() if all(p.get(k) == v for p in protos[1:])} if protos else {}
        # the rest of each protocol: every fact once, with the columns it holds for
        holders: dict[tuple[str, str], list[str]] = {}
        for c, p in zip(vcols, protos):
            rest = {k: v for k, v in p.items() if k not in common or len(protos) == 1}
            for item in _proto_items(rest):
                heads_of = holders.setdefault(item, [])
                if c.header not in heads_of:
                    heads_of.append(c.header)
        by_heads: dict[tuple[str, ...], list[str]] = {}
        for (k, v), hs in holders.items():
            by_heads.setdefault(tuple(hs), []).append(f"{k} {v}")
        parts = [_proto_text(common)] if len(protos) > 1 else []
        parts += [f"{', '.join(hs)}: {', '.join(items)}" for hs, items in by_heads.items()]
        heads = ", ".join(dict.fromkeys(c.header for c in gcols))
        detail = "; ".join(t for t in parts if t)
        out.append((g, f"{heads}." + (f" Protocol: {detail}." if detail else "")))
    kinds = {c.kind for c in cols}
    metrics = {c.metric for c in cols}
    if any(v.stderr is not None for r in rows for c in cols if c.kind == "value" for v in [r.values[c.key]]):
        out.append(("±", "one standard error as the record gives it (perplexity: spread of the per-token NLL; "
                         "accuracy: over the task's examples)."))
    if "delta" in kinds:
        out.append(("Δppl", "perplexity minus the baseline row's on the same protocol; ± paired stderr from the "
                            "cell's ln_ppl_ratio record (per-token NLL differences on the same tokens, x ppl) "
                            f"where recorded. {MARK_INDEP} marks independent errors combined (no paired record: "
                            "overstates the noise of a difference on shared text)."))
    if "recovery" in kinds:
        out.append(("rec", "accuracy / the baseline row's accuracy on the same task; ± paired stderr over the same "
                           f"examples (the records' samples) where recorded, {MARK_INDEP} independent errors."))
    if "delta" in kinds or "recovery" in kinds:
        out.append(("bold / colour", f"Δppl or rec beyond {NOISE_SIGMAS:g} stderr of no change (within it: "
                                     "indistinguishable from the baseline at this sample size)."))
    if "decode_ms_per_token" in metrics:
        out.append(("decode ms/tok", "p50 of the decode steps, in brackets p10–p90 (or the p90 alone) when "
                                     "recorded."))
    ref = list(dict.fromkeys(r["cell"] for r in recs if r["status"] == "ok" and is_reference_path(r)))
    if ref:
        out.append((MARK_REF, f"timed through quantbench's reference forward (the format's codes dequantized into a "
                              f"float GEMM on this device), not the format's own kernel, in {len(ref)} cell(s): "
                              f"{', '.join(ref)}. Not the format's speed."))
    noisy = [r for r in recs if r["status"] == "ok" and is_noisy(r)]
    if noisy:
        reasons = sorted({str(x) for r in noisy for x in (r.get("protocol") or {}).get("noisy_reasons") or []})
        cells = list(dict.fromkeys(r["cell"] for r in noisy))
        out.append((MARK_NOISY, f"noisy measurement (the record's own flag) in {len(cells)} cell(s): "
                                f"{', '.join(cells)}" + (f"; reasons: {'; '.join(reasons)}" if reasons else "")
                    + ". Read those timings as indicative."))
    if any(c.kind == "linear" for c in cols):
        out.append(("linear MB / other MB", "weight bytes (10^6) of the linear layers of the blocks (packed codes, "
                                            "scales, zeros) / of everything else (embeddings, norms, an untied "
                                            "lm_head): kept in the baseline dtype by most methods, quantized by "
                                            "llama.cpp presets."))
    if any(r.marks for r in rows):
        src = next((str((r0.get("model") or {}).get("source_precision")) for r0 in recs), "")
        out.append((MARK_GRID, f"the cell's weight grid contains the source's {src} grid (asymmetric, groups of "
                               "32 aligned with the source blocks, 2^bits - 1 a multiple of 15): it can reproduce the "
                               "source weights exactly, so its error vs this baseline is not a measure of the method."))
    return out


def not_measured(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Failed and unavailable records, one line per (model, metric, status, reason) with the cells it covers."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    cells: dict[str, set[str]] = {}
    for r in latest(records):
        cells.setdefault(r["model"]["name"], set()).add(r["cell"])
        if r["status"] != "ok":
            tag = protocol_tag(r)
            name = short_label(r["metric"]) + (f" [{tag}]" if tag else "") + f" ({r['metric']})"
            groups.setdefault((r["model"]["name"], name, r["status"], str(r["error"])), []).append(r["cell"])
    out = []
    for (model, name, status, err), cs in groups.items():
        cs = list(dict.fromkeys(cs))
        where = (f"every cell ({len(cs)})" if len(cs) == len(cells[model]) and len(cs) > 1
                 else ", ".join(cs))
        out.append((name, f"{status} in {where} of {model} — {err}"))
    return out


def board(records: list[dict[str, Any]]) -> list[Section]:
    """The leaderboard's sections, one per (suite, model) in record order (see :func:`markdown`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in latest(records):
        groups.setdefault((r["suite"], r["model"]["name"]), []).append(r)
    return [_section(s, m, rs) for (s, m), rs in groups.items()]


# --------------------------------------------------------------------------- data out: tidy and wide tables
DATA_FORMATS = ("md", "html", "csv", "parquet", "json")


def _proto_cell(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def tidy_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (suite, model, cell, metric, protocol tag), flat columns: the ids, ``family``, ``label``
    (the baseline's real precision), ``metric``, ``task`` (accuracy), ``column`` (the wide table's column:
    ``metric``, ``metric/task``, with `` [tag]`` when the metric has several protocols), ``value``,
    ``stderr``, ``stderr_kind``, ``lo``/``hi`` (decode p10/p90), ``unit``, ``status``, ``noisy``,
    ``error``, ``protocol_tag`` and the protocol flattened as ``proto.<key>`` (nested values as JSON).

    Derived rows: ``delta_ppl_vs_baseline`` and ``recovery_vs_baseline`` (per task), with their paired
    (``stderr_kind`` "paired") or independent ("independent") stderr."""
    rows: list[dict[str, Any]] = []
    for sec in board(records):
        base_row = next((r for r in sec.rows if r.label == sec.baseline_label and sec.baseline_label), None)
        last: dict[tuple[str, str, str], dict[str, Any]] = {}  # a cell's metric once, when runs are merged
        for r in latest(records):
            if r["suite"] == sec.suite and r["model"]["name"] == sec.model:
                last[(r["cell"], r["metric"], protocol_tag(r))] = r
        sec_recs = list(last.values())
        info = {r.cell: r for r in sec.rows}
        for r in sec_recs:
            br = info[r["cell"]]
            p = r.get("protocol") or {}
            lo, hi = _latency_range(r, 1.0)
            task = p.get("task") if r["metric"] == "accuracy" else None
            row = {"suite": sec.suite, "model": sec.model, "cell": r["cell"], "method": r["method"],
                   "family": br.family, "label": br.label, "holds_source_grid": bool(br.marks),
                   "metric": r["metric"], "task": task, "protocol_tag": protocol_tag(r),
                   "value": r["value"], "stderr": r.get("stderr"),
                   "stderr_kind": "record" if _is_num(r.get("stderr")) else None, "lo": lo, "hi": hi,
                   "unit": r["unit"], "status": r["status"], "noisy": is_noisy(r), "error": r["error"]}
            row.update({f"proto.{k}": _proto_cell(v) for k, v in p.items()})
            rows.append(row)
        for c in sec.columns:
            if c.kind not in ("delta", "recovery") or base_row is None:
                continue
            for br in sec.rows:
                v = br.values[c.key]
                if v.value is None:
                    continue
                task = (next((r.get("protocol") or {} for r in sec_recs if r["metric"] == c.metric
                              and protocol_tag(r) == c.tag), {})).get("task") if c.kind == "recovery" else None
                rows.append({"suite": sec.suite, "model": sec.model, "cell": br.cell, "method": br.method,
                             "family": br.family, "label": br.label, "holds_source_grid": bool(br.marks),
                             "metric": "delta_ppl_vs_baseline" if c.kind == "delta" else "recovery_vs_baseline",
                             "task": task, "protocol_tag": c.tag, "value": v.value, "stderr": v.stderr,
                             "stderr_kind": None if v.stderr is None else ("paired" if v.paired else "independent"),
                             "lo": None, "hi": None, "unit": "ppl" if c.kind == "delta" else "fraction",
                             "status": "ok", "noisy": False, "error": None})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    keys = df["metric"] + df["task"].map(lambda t: f"/{t}" if isinstance(t, str) else "")
    n_tags = df.assign(_k=keys).groupby("_k")["protocol_tag"].nunique()
    df["column"] = [k + (f" [{t}]" if n_tags[k] > 1 else "") for k, t in zip(keys, df["protocol_tag"])]
    front = ["suite", "model", "cell", "method", "family", "label", "holds_source_grid", "metric", "task",
             "column", "value", "stderr", "stderr_kind", "lo", "hi", "unit", "status", "noisy", "error",
             "protocol_tag"]
    proto = sorted(c for c in df.columns if c.startswith("proto."))
    return df[front + proto]


WIDE_INDEX = ["suite", "model", "cell"]


def wide_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """One row per (suite, model, cell) with ``method``, ``family``, ``label`` and one column per tidy
    ``column`` (metric, metric/task, [tag] when needed) holding the value."""
    if tidy.empty:
        return tidy
    vals = tidy.pivot(index=WIDE_INDEX, columns="column", values="value")
    order = list(dict.fromkeys(tidy["column"]))
    vals = vals[[c for c in order if c in vals.columns]]
    ids = tidy.drop_duplicates(WIDE_INDEX).set_index(WIDE_INDEX)[["method", "family", "label"]]
    out = ids.join(vals).reset_index()
    out.columns.name = None
    return out


def parse_formats(spec: Iterable[str] | None) -> list[str]:
    """``--format`` values (each a name or comma list; ``all``) as a list of :data:`DATA_FORMATS`."""
    out: list[str] = []
    for item in spec or ["md", "html"]:
        for f in str(item).split(","):
            f = f.strip().lower()
            if not f:
                continue
            if f == "all":
                out += list(DATA_FORMATS)
            elif f in DATA_FORMATS:
                out.append(f)
            else:
                raise ConfigError(f"--format: unknown format {f!r} (one of {', '.join(DATA_FORMATS)}, all)")
    return list(dict.fromkeys(out))


def check_parquet() -> None:
    """ConfigError unless pandas can write parquet (pyarrow installed)."""
    try:
        import pyarrow  # noqa: F401  (deferred: an optional dependency)
    except ImportError:
        raise ConfigError("parquet output needs pyarrow, which is not installed: pip install 'quantbench[parquet]' "
                          "(or pyarrow), or pick --format csv/json") from None


def write_data(records: list[dict[str, Any]], out: str | Path, formats: Iterable[str]) -> list[Path]:
    """leaderboard_tidy.* and leaderboard_wide.* (csv, parquet, json) into ``out``; returns the paths."""
    fmts = [f for f in formats if f in ("csv", "parquet", "json")]
    if "parquet" in fmts:
        check_parquet()
    tidy = tidy_table(records)
    wide = wide_table(tidy)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, df in (("tidy", tidy), ("wide", wide)):
        for f in fmts:
            p = out / f"leaderboard_{name}.{f}"
            if f == "csv":
                df.to_csv(p, index=False)
            elif f == "parquet":
                df.to_parquet(p, index=False)
            else:
                p.write_text(df.to_json(orient="records", indent=1) + "\n", encoding="utf-8")
            paths.append(p)
    return paths


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
