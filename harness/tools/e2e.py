"""The end-to-end device check (`quantbench gpu-check --e2e`): every method family on the device, against the CPU.

Runs ``suites/gpu-smoke.yaml`` (every method family on a seeded random llama of hidden size 1024, plus the
embedded default model) with its models moved to ``device`` (``cuda`` on a GPU machine), then the same suite
with its models on the CPU, and compares the two runs cell by cell:

- every cell ``ok`` on the device (a cell whose metric is ``unavailable`` on both sides, e.g. energy, is fine);
- the ``fp`` and ``rtn*`` rows' float32 perplexities equal the CPU's to ``PPL_RTOL`` relative (the other
  methods' calibrations and searches may legitimately take other branches on other hardware, so their
  differences are reported, not gated).  On the CPU (the CPU side, and both sides of the CPU form) the
  packed integer weights run through the fp32 reference path (``kernels.intmm.CPU_FAST_PATH`` off): the
  CPU fast path computes in bf16, which put the random llama's rtn perplexities 6e-4 (w8) and 8e-4
  (w4g128) from the CUDA kernels' in H200 run 2 of session 9, where the reference path is 9e-8 and 3e-6
  from them (docs/gpu.md);
- GPTQ's quantize seconds on the device and on the CPU, and their ratio.

The CPU form (``device="cpu"``) takes the same code path with both runs on the CPU; CI runs it on the
random model with a few cells and one window (``tests/harness/test_e2e.py``). Results: ``e2e.json`` and
the two run directories under ``out``; the summary table is printed.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...kernels import intmm
from ..paths import SUITES_DIR
from ..run.records import read_records
from ..run.runner import run_suite
from ..run.suite import cell_filter, load_suite, with_models

#: fp and RTN float32 perplexities on the device must equal the CPU's to this relative difference
PPL_RTOL = 1e-4
SUITE = SUITES_DIR / "gpu-smoke.yaml"


def _by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        out.setdefault((r["model"]["name"], r["cell"]), {})[r["metric"]] = r
    return out


def compare_runs(device_records: list[dict[str, Any]], cpu_records: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per (model, cell) of the device run: its statuses, perplexities on both sides, their
    relative difference (gated for fp/rtn rows), quantize seconds on both sides; ``ok`` overall."""
    dev, cpu = _by_cell(device_records), _by_cell(cpu_records)
    rows = []
    for (model, cell), mets in sorted(dev.items()):
        ref = cpu.get((model, cell), {})
        bad = sorted(m for m, r in mets.items() if r["status"] not in ("ok", "unavailable")
                     or (r["status"] == "unavailable" and ref.get(m, {}).get("status") == "ok"))
        ppl_d, ppl_c = (mets.get("perplexity", {}).get("value"), ref.get("perplexity", {}).get("value"))
        rel = abs(ppl_d - ppl_c) / abs(ppl_c) if ppl_d is not None and ppl_c else None
        gated = cell == "fp" or cell.startswith("rtn")
        q_d, q_c = (mets.get("quantize_seconds", {}).get("value"), ref.get("quantize_seconds", {}).get("value"))
        problems = [f"{m}: {mets[m]['status']} ({(mets[m].get('error') or '')[:120]})" for m in bad]
        if not ref:
            problems.append("no CPU record to compare with")
        if gated and (rel is None or not math.isfinite(rel) or rel > PPL_RTOL):
            problems.append(f"perplexity differs from the CPU's by {rel} (> {PPL_RTOL})")
        rows.append({"model": model, "cell": cell, "ppl_device": ppl_d, "ppl_cpu": ppl_c, "ppl_rel_diff": rel,
                     "ppl_gated": gated, "quantize_s_device": q_d, "quantize_s_cpu": q_c,
                     "quantize_ratio_cpu_over_device": (q_c / q_d) if q_c and q_d else None,
                     "ok": not problems, "problems": problems})
    return {"rows": rows, "ok": bool(rows) and all(r["ok"] for r in rows), "ppl_rtol": PPL_RTOL}


def table(result: dict[str, Any], device: str) -> str:
    lines = [f"{'model':28s} {'cell':18s} {'ppl ' + device:>14s} {'ppl cpu':>14s} {'rel diff':>9s} "
             f"{'quant s dev':>11s} {'quant s cpu':>11s}  status"]
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in result["rows"]:
        lines.append(f"{r['model'][-28:]:28s} {r['cell']:18s} {f(r['ppl_device'], '14.6f')} {f(r['ppl_cpu'], '14.6f')} "
                     f"{f(r['ppl_rel_diff'], '9.2e')} {f(r['quantize_s_device'], '11.2f')} "
                     f"{f(r['quantize_s_cpu'], '11.2f')}  {'ok' if r['ok'] else '; '.join(r['problems'])}")
    lines.append(f"e2e {device} vs cpu: {'PASS' if result['ok'] else 'FAIL'} "
                 f"({sum(r['ok'] for r in result['rows'])}/{len(result['rows'])} cells ok)")
    return "\n".join(lines)


@contextlib.contextmanager
def _fp32_cpu_kernels() -> Iterator[None]:
    """The CPU's packed integer weights through the fp32 reference path (not the bf16 fast path)."""
    saved, intmm.CPU_FAST_PATH = intmm.CPU_FAST_PATH, False
    try:
        yield
    finally:
        intmm.CPU_FAST_PATH = saved


def run_e2e(out: Path, device: str = "cuda", models: Sequence[Any] | None = None,
            cells: str | Sequence[str] | None = None, limit: int | None = None,
            suite: Path = SUITE) -> dict[str, Any]:
    """Run ``suite`` on ``device`` and on the CPU under ``out`` and compare (:func:`compare_runs`); writes
    ``out/e2e.json`` and returns it."""
    s = load_suite(suite)
    ms = list(models) if models else None
    pats = cells.split(",") if isinstance(cells, str) else list(cells or [])
    runs = {}
    for side, dev in (("device", device), ("cpu", "cpu")):
        with _fp32_cpu_kernels() if dev == "cpu" else contextlib.nullcontext():  # either side on the CPU
            run_dir = run_suite(with_models(s, ms, None, dev), out / f"e2e-{side}-{dev.replace(':', '')}",
                                False, None, limit, cell_filter(pats))
        runs[side] = read_records(run_dir / "records.jsonl")
    result = compare_runs(runs["device"], runs["cpu"])
    result.update(device=device, suite=str(suite), limit=limit, cells=cells)
    (out / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
