"""`quantbench compare BASELINE CURRENT` (CI regression gate) and `quantbench baseline update RUN_DIR`.

Cells are matched by (model, cell name, method config): a cell whose name is kept but whose method
config changed is still compared (and flagged), a renamed cell with an unchanged config is found by
(model, method config).  Metrics are matched by (name, protocol tag): numbers of different protocols
are never compared.

Tolerances come from the suite's ``tolerances:`` block, one entry per metric, merged over the
default of every registered metric (``MetricSpec.tolerance``, :func:`default_tolerances`; a suite's
entry replaces the default of that metric):

- ``rel`` / ``abs``: the current value may be worse than the baseline by ``max(rel * |baseline|, abs)``;
  "worse" follows the metric's direction (``higher_is_better``; both directions when it has none);
- ``recovery``: the current value must be at least this fraction of the current run's fp row of the
  same model and protocol (``value / fp`` when higher is better, ``fp / value`` when lower is better);
- hardware-bound metrics (``MetricSpec.hardware_bound``: timings, energy, peak memory) are compared only
  when the hardware fingerprint (CPU model, GPU model, threads) of the two records matches; otherwise
  they are skipped with a warning.

A metric measured in the baseline and missing, failed or unavailable in the current run, and a
baseline cell missing from the current run, are regressions unless ``--allow-missing``.

The gate fails closed: a baseline must be read whole (every line a valid record, at least one); a run
may end in one torn line (a crash mid-write, skipped with a warning) and is otherwise read whole too.
Anything else unreadable is a :class:`ConfigError` naming the file and line.
Exit status: 1 on any regression, 2 on bad input (paths, records, tolerances), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from ...methods.base import ConfigError, did_you_mean
from ..measure import METRICS
from ..measure.base import validate_tolerances
from ..paths import REPO_ROOT, SUITES_DIR
from ..run.records import VOLATILE_PROVENANCE
from .leaderboard import NOISE_SIGMAS, load_records, md_code, md_text, protocol_tag, spec_of

log = logging.getLogger(__name__)

BASELINES_DIR = REPO_ROOT / "results" / "baselines"
RUN_ID_PREFIX = "baseline:"

# result of one comparison, in order of severity
REGRESSION, MISSING, IMPROVED, NEW, OK, SKIPPED, INFO = (
    "REGRESSION", "MISSING", "improved", "new", "ok", "skipped", "info")
FAILING = {REGRESSION, MISSING}
SEVERITY = {k: i for i, k in enumerate([REGRESSION, MISSING, IMPROVED, NEW, SKIPPED, INFO, OK])}


# --------------------------------------------------------------------------- loading
def resolve_records_path(spec: str | Path) -> Path:
    """A run directory, a records/baseline JSONL file, or a baseline name (results/baselines/<name>.jsonl)."""
    p = Path(spec)
    if p.is_dir():
        p = p / "records.jsonl"
    elif not p.exists() and safe_baseline_name(str(spec)) and (BASELINES_DIR / f"{spec}.jsonl").is_file():
        p = BASELINES_DIR / f"{spec}.jsonl"
    if not p.is_file():
        raise ConfigError(f"no records at {spec} (expected a run directory, a .jsonl file or a baseline name)")
    return p


def safe_baseline_name(name: str) -> bool:
    """Whether ``name`` can name a file directly in results/baselines/ (no path, no hidden or odd name)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*", name)) and ".." not in name


def baseline_path(name: str) -> Path:
    """results/baselines/<name>.jsonl; a name that would leave that folder (``../x``, ``a/b``, ``.x``) is refused."""
    if not safe_baseline_name(name):
        raise ConfigError(f"suite name {name!r} cannot name a baseline file (letters, digits and _ . + = - only, "
                          "no '..', not starting with '.' or '-'); pass --out FILE")
    path = BASELINES_DIR / f"{name}.jsonl"
    root = BASELINES_DIR.resolve()
    if path.resolve().parent != root:  # a symlink planted in results/baselines/
        raise ConfigError(f"{path} resolves outside {root}; pass --out FILE")
    return path


CellKey = tuple[str, str]  # (model name, cell name)
MetricKey = tuple[str, str]  # (metric, protocol tag)


@dataclass
class CellRecords:
    model: str
    cell: str
    config: Any
    metrics: dict[MetricKey, dict[str, Any]] = field(default_factory=dict)

    @property
    def config_key(self) -> str:
        return json.dumps(self.config, sort_keys=True)


def index_records(records: list[dict[str, Any]]) -> dict[CellKey, CellRecords]:
    """(model, cell) -> its records by (metric, protocol tag); the last record of a key wins."""
    out: dict[CellKey, CellRecords] = {}
    for r in records:
        key = (r["model"]["name"], r["cell"])
        c = out.get(key)
        if c is None:
            c = out[key] = CellRecords(key[0], key[1], r.get("method_config"))
        c.config = r.get("method_config")
        c.metrics[(r["metric"], protocol_tag(r))] = r
    return out


# --------------------------------------------------------------------------- tolerances
def default_tolerances() -> dict[str, dict[str, float]]:
    """Every registered metric's default tolerance (its spec's), by metric."""
    return {name: dict(spec.tolerance) for name, spec in METRICS.items()}


def _hardware_bound(metric: str) -> bool:
    spec = spec_of(metric)
    return spec is not None and spec.hardware_bound


def _read_tolerances_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    tol = (doc["tolerances"] or {}) if "tolerances" in doc else doc
    if not isinstance(tol, dict):
        raise ConfigError(f"{path}: tolerances: expected a mapping of metric -> tolerance, got {tol!r:.60}")
    return dict(tol)


def load_tolerances(spec: str | Path | None, current: Path | None = None,
                    suite_name: str | None = None) -> tuple[dict[str, dict[str, float]], str]:
    """Tolerances merged over the defaults, and where they came from.

    ``spec``: a YAML file (a suite, a file with a ``tolerances:`` key, or a bare mapping) or a
    built-in suite's name; without it, the current run's suite.resolved.yaml, then suites/<suite>.yaml."""
    source, raw = "defaults", {}
    candidates: list[Path] = []
    if spec:
        p = Path(spec)
        candidates = [p, SUITES_DIR / p.name, SUITES_DIR / f"{p.name}.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"tolerances: no file or built-in suite named {spec}")
        raw, source = _read_tolerances_yaml(found), str(found)
    else:
        if current is not None and (current / "suite.resolved.yaml").is_file():
            candidates.append(current / "suite.resolved.yaml")
        if suite_name:
            candidates.append(SUITES_DIR / f"{suite_name}.yaml")
        for c in candidates:
            if c.is_file():
                raw, source = _read_tolerances_yaml(c), str(c)
                break
    tol = default_tolerances()
    tol.update(validate_tolerances(raw, f"{Path(source).name}: tolerances"))
    return tol, source


# --------------------------------------------------------------------------- comparison
@dataclass
class Row:
    model: str
    cell: str
    metric: str
    protocol: str
    baseline: float | None
    current: float | None
    result: str
    tolerance: str = ""
    note: str = ""
    baseline_cell: str | None = None
    noise_stderr: float | None = None  # stderr of current - baseline (see noise_of)
    noise_kind: str = ""  # paired | paired-bound | independent
    within_noise: bool | None = None  # |Δ| <= NOISE_SIGMAS x noise_stderr (None: no stderr known)

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline

    @property
    def rel_delta(self) -> float | None:
        d = self.delta
        if d is None or not self.baseline:
            return None
        return d / abs(self.baseline)


@dataclass
class Comparison:
    baseline: str
    current: str
    tolerance_source: str
    rows: list[Row]
    missing_cells: list[str]
    new_cells: list[str]
    warnings: list[str]
    allow_missing: bool = False

    @property
    def regressions(self) -> list[Row]:
        failing = {REGRESSION} if self.allow_missing else FAILING
        return [r for r in self.rows if r.result in failing]

    @property
    def failed(self) -> bool:
        return bool(self.regressions) or (bool(self.missing_cells) and not self.allow_missing)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d.update(delta=r.delta, rel_delta=r.rel_delta)
            rows.append(d)
        return {"passed": not self.failed, "regressions": len(self.regressions) + (
                    0 if self.allow_missing else len(self.missing_cells)),
                "baseline": self.baseline, "current": self.current, "tolerances": self.tolerance_source,
                "missing_cells": self.missing_cells, "new_cells": self.new_cells, "warnings": self.warnings,
                "rows": rows}


def fingerprint(rec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Hardware identity for timing comparisons: (CPU model, GPU model, torch threads)."""
    p = rec.get("provenance") or {}
    hw = p.get("hardware") or {}
    return hw.get("cpu"), hw.get("gpu"), p.get("threads")


def _fmt_fp(fp: tuple[Any, Any, Any]) -> str:
    return f"cpu {fp[0]}, gpu {fp[1]}, threads {fp[2]}"


def _config_diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys)
    return f"{json.dumps(a, sort_keys=True)} → {json.dumps(b, sort_keys=True)}"


def _tol_text(tol: dict[str, float] | None) -> str:
    if not tol:
        return "—"
    return ", ".join(f"{k} {v:g}" for k, v in tol.items())


def _worse_by(base: float, cur: float, hib: bool | None) -> float:
    """How much worse ``cur`` is than ``base`` (negative: better); both directions count when hib is None."""
    if hib is None:
        return abs(cur - base)
    return base - cur if hib else cur - base


def _recovery(value: float, fp: float, hib: bool | None) -> float | None:
    if hib is None:
        return None
    if hib:
        return value / fp if fp else None
    return fp / value if value else None


def compare_records(base_recs: list[dict[str, Any]], cur_recs: list[dict[str, Any]],
                    tolerances: dict[str, dict[str, float]] | None = None, *, baseline_name: str = "baseline",
                    current_name: str = "current", tolerance_source: str = "defaults",
                    allow_missing: bool = False) -> Comparison:
    tolerances = tolerances if tolerances is not None else default_tolerances()
    base, cur = index_records(base_recs), index_records(cur_recs)
    warnings: list[str] = []
    # --- match cells: same (model, name); then same (model, method config) among the rest
    pairs: list[tuple[CellRecords, CellRecords, str]] = []
    left_b = [k for k in base if k not in cur]
    left_c = [k for k in cur if k not in base]
    for k in base:
        if k in cur:
            note = ""
            if base[k].config_key != cur[k].config_key:
                note = f"method config changed ({_config_diff(base[k].config, cur[k].config)})"
                warnings.append(f"{md_code(f'{k[0]}/{k[1]}')}: {md_text(note)}")
            pairs.append((base[k], cur[k], note))
    for kb in list(left_b):
        for kc in left_c:
            if kb[0] == kc[0] and base[kb].config_key == cur[kc].config_key:
                pairs.append((base[kb], cur[kc], f"renamed from {kb[1]}"))
                left_b.remove(kb)
                left_c.remove(kc)
                break
    missing_cells = [f"{m}/{c}" for m, c in left_b]
    new_cells = [f"{m}/{c}" for m, c in left_c]
    # fp rows of the current run, for recovery
    fp_cur: dict[tuple[str, MetricKey], dict[str, Any]] = {}
    for c in cur.values():
        for mk, r in c.metrics.items():
            if r.get("method") == "fp" or c.cell == "fp":
                fp_cur.setdefault((c.model, mk), r)

    rows: list[Row] = []
    hw_warned: set[tuple[Any, Any]] = set()
    for b, c, cell_note in pairs:
        for mk in dict.fromkeys([*b.metrics, *c.metrics]):
            metric, tag = mk
            rb, rc = b.metrics.get(mk), c.metrics.get(mk)
            tol = tolerances.get(metric)
            row = Row(c.model, c.cell, metric, tag, None, None, OK, _tol_text(tol), cell_note,
                      b.cell if b.cell != c.cell else None)
            rows.append(row)
            if rb is not None and rb["status"] == "ok":
                row.baseline = rb["value"]
            if rc is not None and rc["status"] == "ok":
                row.current = rc["value"]
            if rb is None:
                row.result = NEW
                continue
            if rc is None:
                row.result, row.note = MISSING, _join(cell_note, "not measured in the current run")
                continue
            sb, sc = rb["status"], rc["status"]
            if _hardware_bound(metric) and fingerprint(rb) != fingerprint(rc):
                row.result = SKIPPED
                row.note = _join(cell_note, "hardware differs: timing not compared")
                pair = (fingerprint(rb), fingerprint(rc))
                if pair not in hw_warned:
                    hw_warned.add(pair)
                    warnings.append(f"{md_text(metric)} and other timing tolerances skipped: hardware differs "
                                    f"(baseline: {md_text(_fmt_fp(pair[0]))}; current: {md_text(_fmt_fp(pair[1]))})")
                continue
            if sb != "ok":
                row.result = IMPROVED if sc == "ok" else OK
                row.note = _join(cell_note, f"baseline {sb}" + (f", current {sc}" if sc != "ok" else ""))
                continue
            if sc != "ok":
                row.result = REGRESSION if sc == "failed" else MISSING
                row.note = _join(cell_note, f"current {sc}: {rc.get('error')}")
                continue
            _judge(row, rb, rc, tol, fp_cur.get((c.model, mk)), warnings)
            _noise(row, rb, rc, b, c)
            pb, pc = rb.get("protocol") or {}, rc.get("protocol") or {}
            if tag and pb != pc:  # a tagged protocol (text, windows, ...); untagged ones carry breakdowns
                diff = _config_diff(pb, pc)
                row.note = _join(row.note, f"protocol details differ ({diff})")
                msg = (f"protocol details of {md_text(metric)} [{md_text(tag)}] differ between the runs "
                       f"({md_text(diff)})")
                if msg not in warnings:
                    warnings.append(msg)
    rows.sort(key=lambda r: SEVERITY.get(r.result, 99))
    return Comparison(baseline_name, current_name, tolerance_source, rows, missing_cells, new_cells, warnings,
                      allow_missing)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _judge(row: Row, rb: dict[str, Any], rc: dict[str, Any], tol: dict[str, float] | None,
           fp: dict[str, Any] | None, warnings: list[str]) -> None:
    base, cur = rb["value"], rc["value"]
    hib = rc.get("higher_is_better", rb.get("higher_is_better"))
    if base is None or cur is None or any(isinstance(v, float) and not math.isfinite(v) for v in (base, cur)):
        row.result = REGRESSION if base is not None else IMPROVED
        return
    if not tol:
        row.result = INFO if base != cur else OK
        return
    results = []
    if "rel" in tol or "abs" in tol:
        allowed = max(tol.get("rel", 0.0) * abs(base), tol.get("abs", 0.0))
        worse = _worse_by(base, cur, hib)
        if worse > allowed * (1 + 1e-12) + 1e-15:
            results.append(REGRESSION)
            row.note = _join(row.note, f"worse than baseline by {worse:.4g} > allowed {allowed:.4g}")
        elif hib is not None and -worse > allowed * (1 + 1e-12) + 1e-15:
            results.append(IMPROVED)
        else:
            results.append(OK)
    if "recovery" in tol:
        if fp is None or fp["status"] != "ok" or fp["value"] is None:
            msg = (f"{md_text(row.metric)} recovery not checked for {md_code(f'{row.model}/{row.cell}')}: "
                   "no fp row in the current run")
            warnings.append(msg)
        else:
            rec = _recovery(cur, fp["value"], hib)
            if rec is not None:
                ok = rec >= tol["recovery"] - 1e-12
                results.append(OK if ok else REGRESSION)
                row.note = _join(row.note, f"recovery {rec:.4f} {'≥' if ok else '<'} {tol['recovery']:g} of fp")
    row.result = min(results, key=lambda r: SEVERITY[r]) if results else OK


def _ratio_rec(cell: CellRecords, tag: str) -> dict[str, Any] | None:
    r = cell.metrics.get(("ln_ppl_ratio", tag)) or next(
        (x for (m, _), x in cell.metrics.items() if m == "ln_ppl_ratio"), None)
    return r if r is not None and r["status"] == "ok" and _num_ok(r.get("stderr")) else None


def _num_ok(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def noise_of(rb: dict[str, Any], rc: dict[str, Any], cb: CellRecords | None = None,
             cc: CellRecords | None = None) -> tuple[float | None, str]:
    """The stderr of ``current - baseline`` for one metric, and how it was found:

    - ``paired``: accuracy with per-example ``samples`` of one length in both records: the stderr of the
      mean per-example difference (the same examples scored twice);
    - ``paired-bound``: perplexity (and ``ln_ppl_ratio``) with an ``ln_ppl_ratio`` record in both cells: each
      is a paired per-token NLL difference vs its run's reference on the same tokens, so the per-token
      difference between the runs has a stderr of at most the sum of the two (Cauchy-Schwarz), times the
      current perplexity for perplexity (the delta method);
    - ``independent``: both records carry a stderr: combined as independent errors;
    - none: ``(None, "")``."""
    metric = rc["metric"]
    qs, bs = rc.get("samples"), rb.get("samples")
    if (metric == "accuracy" and isinstance(qs, list) and isinstance(bs, list) and len(qs) == len(bs) > 1
            and all(_num_ok(x) for x in qs + bs)):
        d = [a - b for a, b in zip(qs, bs)]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
        return math.sqrt(var / len(d)), "paired"
    if metric in ("perplexity", "ln_ppl_ratio") and cb is not None and cc is not None:
        tag = protocol_tag(rc)
        xb, xc = _ratio_rec(cb, tag), _ratio_rec(cc, tag)
        if xb is not None and xc is not None:
            se = float(xb["stderr"]) + float(xc["stderr"])
            return (se * float(rc["value"]) if metric == "perplexity" else se), "paired-bound"
    sb, sc = rb.get("stderr"), rc.get("stderr")
    if _num_ok(sb) and _num_ok(sc):
        return math.hypot(sb, sc), "independent"
    return None, ""


def _noise(row: Row, rb: dict[str, Any], rc: dict[str, Any], cb: CellRecords, cc: CellRecords) -> None:
    """Add to ``row`` whether its change is within NOISE_SIGMAS stderrs (information: the tolerance gate
    alone decides the result and the exit status)."""
    d = row.delta
    if d is None or not math.isfinite(d):
        return
    se, kind = noise_of(rb, rc, cb, cc)
    if se is None or not math.isfinite(se):
        return
    row.noise_stderr, row.noise_kind = se, kind
    row.within_noise = abs(d) <= NOISE_SIGMAS * se
    if row.within_noise and d != 0:
        row.note = _join(row.note, f"within noise (|Δ| {abs(d):.3g} ≤ {NOISE_SIGMAS:g} x stderr {se:.3g}, {kind})")


# --------------------------------------------------------------------------- output
def _num(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.6g}"


def _noise_text(r: Row) -> str:
    if r.noise_stderr is None:
        return "—"
    return (f"±{r.noise_stderr:.3g} {r.noise_kind}: "
            f"{'within' if r.within_noise else 'beyond'} {NOISE_SIGMAS:g}σ")


def to_markdown(cmp: Comparison) -> str:
    n_reg = len(cmp.regressions) + (0 if cmp.allow_missing else len(cmp.missing_cells))
    head = f"## quantbench compare: {'REGRESSION' if cmp.failed else 'PASS'}"
    counts = {k: sum(r.result == k for r in cmp.rows) for k in SEVERITY}
    summary = [f"{v} {k.lower()}" for k, v in counts.items() if v]
    if cmp.missing_cells:
        summary.append(f"{len(cmp.missing_cells)} baseline cell(s) missing")
    lines = [head, "",
             f"baseline {md_code(cmp.baseline)} · current {md_code(cmp.current)} · "
             f"tolerances: {md_code(cmp.tolerance_source)}", "",
             f"{len(cmp.rows)} metric comparisons, {n_reg} failing: " + ", ".join(summary), ""]
    failing = [r for r in cmp.rows if r in cmp.regressions]
    if failing or (cmp.missing_cells and not cmp.allow_missing):
        lines += ["### Regressions", ""]
        for r in failing:
            rd = f" ({r.rel_delta:+.2%})" if r.rel_delta is not None else ""
            lines.append(f"- {md_code(f'{r.model}/{r.cell}')} **{md_text(r.metric)}**"
                         f"{f' [{md_text(r.protocol)}]' if r.protocol else ''}: "
                         f"{_num(r.baseline)} → {_num(r.current)}{rd}; {r.result.lower()}"
                         f"{f' — {md_text(r.note)}' if r.note else ''} (tolerance {r.tolerance})")
        if not cmp.allow_missing:
            for c in cmp.missing_cells:
                lines.append(f"- {md_code(c)}: cell missing from the current run")
        lines.append("")
    if cmp.warnings:
        lines += ["### Warnings", ""] + [f"- {w}" for w in cmp.warnings] + [""]
    if cmp.missing_cells and cmp.allow_missing:
        lines += ["Missing cells (allowed): " + ", ".join(md_code(c) for c in cmp.missing_cells), ""]
    if cmp.new_cells:
        lines += ["New cells (not in the baseline): " + ", ".join(md_code(c) for c in cmp.new_cells), ""]
    lines += [f"<details><summary>all {len(cmp.rows)} comparisons</summary>", "",
              "| model | cell | metric | protocol | baseline | current | Δ | Δ% | noise (stderr of Δ) | tolerance | "
              "result | note |",
              "|---|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in cmp.rows:
        d = f"{r.delta:+.4g}" if r.delta is not None else "—"
        rd = f"{r.rel_delta:+.2%}" if r.rel_delta is not None else "—"
        res = f"**{r.result}**" if r.result in FAILING else r.result
        t = md_text
        lines.append(f"| {t(r.model)} | {t(r.cell)} | {t(r.metric)} | {t(r.protocol or '—')} | {_num(r.baseline)} | "
                     f"{_num(r.current)} | {d} | {rd} | {t(_noise_text(r))} | {t(r.tolerance)} | {res} | "
                     f"{t(r.note)} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- baselines
def baseline_records(records: list[dict[str, Any]], suite: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Deterministic baseline records of one suite: latest record per (model, cell, metric, protocol),
    volatile provenance and the run id stripped, sorted."""
    suites = sorted({r["suite"] for r in records})
    if not records:
        raise ConfigError("no records to make a baseline from")
    if suite is None:
        if len(suites) > 1:
            raise ConfigError(f"the run holds several suites ({', '.join(suites)}); pick one with --suite")
        suite = suites[0]
    elif suite in suites:
        records = [r for r in records if r["suite"] == suite]
    elif len(suites) > 1:
        raise ConfigError(f"suite '{suite}' not in the run{did_you_mean(suite, suites)}")
    latest: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in records:
        latest[(r["model"]["name"], r["cell"], r["metric"], protocol_tag(r))] = r
    out = []
    for key in sorted(latest):
        r = json.loads(json.dumps(latest[key]))
        r["run_id"] = f"{RUN_ID_PREFIX}{suite}"
        r["provenance"] = {k: v for k, v in (r.get("provenance") or {}).items() if k not in VOLATILE_PROVENANCE}
        out.append(r)
    return suite, out


def update_baseline(run: str | Path, suite: str | None = None, out: str | Path | None = None) -> Path:
    """Write the baseline of a run (read whole: a torn run makes no baseline) and return its path."""
    records = load_records(resolve_records_path(run), what="records to make a baseline from")
    name, recs = baseline_records(records, suite)
    path = Path(out) if out else baseline_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs), encoding="utf-8")
    bad = [r for r in recs if r["status"] == "failed"]
    if bad:
        log.warning("%d failed record(s) in the baseline (e.g. %s/%s %s)", len(bad), bad[0]["model"]["name"],
                    bad[0]["cell"], bad[0]["metric"])
    return path


# --------------------------------------------------------------------------- CLI
def cmd_compare(args: argparse.Namespace) -> int:
    bpath, cpath = resolve_records_path(args.baseline), resolve_records_path(args.current)
    # fail closed: a baseline is read whole; a run may only lose a torn last line (with a warning)
    base_recs = load_records(bpath, what="baseline records")
    cur_recs = load_records(cpath, torn_tail=True)
    suite = next((r["suite"] for r in cur_recs), None) or next((r["suite"] for r in base_recs), None)
    cur_dir = cpath.parent if cpath.name == "records.jsonl" else None
    tol, source = load_tolerances(args.tolerances, cur_dir, suite)
    cmp = compare_records(base_recs, cur_recs, tol, baseline_name=str(args.baseline),
                          current_name=str(args.current), tolerance_source=source,
                          allow_missing=args.allow_missing)
    if args.json:  # before stdout: an unwritable --json is an error with nothing half-reported
        Path(args.json).write_text(json.dumps(cmp.to_json(), indent=1) + "\n", encoding="utf-8")
    sys.stdout.write(to_markdown(cmp))
    return 1 if cmp.failed else 0


def cmd_baseline_update(args: argparse.Namespace) -> int:
    path = update_baseline(args.run_dir, args.suite, args.out)
    n = len(load_records(path))
    print(f"wrote {path} ({n} records); review and commit it to change the baseline")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare a run with a baseline; exit 1 on a regression",
                       description="Compare CURRENT with BASELINE (run directories, records/baseline .jsonl files "
                                   "or baseline names in results/baselines/). Prints a Markdown diff; exit 1 on "
                                   "a regression beyond the suite's tolerances, 2 on bad input (a baseline or "
                                   "run that cannot be read whole, a bad tolerance file).")
    c.add_argument("baseline")
    c.add_argument("current")
    c.add_argument("--json", metavar="OUT", help="also write a JSON summary to OUT")
    c.add_argument("--tolerances", metavar="SUITE_OR_YAML",
                   help="suite (name or file) or YAML whose `tolerances:` to use "
                        "(default: the current run's suite.resolved.yaml)")
    c.add_argument("--allow-missing", action="store_true",
                   help="report missing cells/metrics without failing")
    c.set_defaults(fn=cmd_compare)

    b = sub.add_parser("baseline", help="manage committed baselines (results/baselines/)")
    bsub = b.add_subparsers(dest="baseline_command", required=True)
    u = bsub.add_parser("update", help="write results/baselines/<suite>.jsonl from a run")
    u.add_argument("run_dir")
    u.add_argument("--suite", help="suite name (default: the run's suite)")
    u.add_argument("--out", help="output file (default results/baselines/<suite>.jsonl)")
    u.set_defaults(fn=cmd_baseline_update)
