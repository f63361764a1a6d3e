"""`quantbench export FORMAT RUN_DIR:CELL OUT`: write a run cell's quantized model to a checkpoint.

Runs do not keep quantized weights (they would dominate the disk); export re-creates the cell
from the run's ``suite.resolved.yaml`` (same method configs, calibration spec and seed, so the
same quantized model on the same machine) and writes it:
- ``gptq``: safetensors + ``quantize_config.json`` in the GPTQ / GPTQModel / transformers convention;
- ``gguf``: a GGUF file with ggml block types, written with the ``gguf`` package.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from ...methods.base import ConfigError
from ...methods.gguf_export import export_gguf
from ...methods.gptq_export import export_gptq
from ...methods.quantize import quantize
from ..inputs import data as datamod
from ..inputs.models import load_model, model_key

log = logging.getLogger(__name__)


def parse_run_cell(run_cell: str) -> tuple[Path, str]:
    run, sep, cell = run_cell.rpartition(":")
    if not sep or not run or not cell:
        raise ConfigError(f"expected RUN_DIR:CELL, got '{run_cell}'")
    if not (Path(run) / "suite.resolved.yaml").exists():
        raise ConfigError(f"{run} is not a run directory (no suite.resolved.yaml)")
    return Path(run), cell


def rebuild_cell(run_dir: Path, cell_name: str, model_name: str | None = None) -> tuple[Any, Any, list[Any]]:
    """Re-create a run cell's quantized model: returns (quantized model, LoadedModel, methods).

    The cell goes through :func:`~quantbench.methods.quantize.quantize` as the runner ran it: a fresh
    copy of the base model, the run's seed, calibration sampled from the cell's spec with that seed.
    """
    resolved = yaml.safe_load((run_dir / "suite.resolved.yaml").read_text())
    cells = {c["name"]: c for c in resolved["cells"]}
    if cell_name not in cells:
        raise ConfigError(f"no cell '{cell_name}' in {run_dir}; cells: {', '.join(cells)}")
    cell = cells[cell_name]
    models = resolved["models"]
    spec = next((m for m in models if model_name in (None, model_key(m))), None)
    if spec is None:
        raise ConfigError(f"no model '{model_name}' in {run_dir}; models: {[model_key(m) for m in models]}")
    base = load_model(spec)
    seed = resolved.get("seed", 0)
    env_path = run_dir / "env.json"
    if env_path.exists():
        log.info("re-creating %s as run at git %s", cell_name, json.loads(env_path.read_text()).get("git_sha"))
    chain = [(c["method"], {k: v for k, v in c.items() if k not in ("method", "version")}) for c in cell["method"]]
    model, methods = quantize(copy.deepcopy(base.model), chain,
                              lambda: datamod.calibration(cell["calibration"], base.tokenizer, seed), seed)
    return model.eval(), base, methods


def cmd_export(args: argparse.Namespace) -> int:
    run_dir, cell = parse_run_cell(args.run_cell)
    model, base, _ = rebuild_cell(run_dir, cell, args.model)
    out = Path(args.out)
    if args.format == "gptq":
        export_gptq(model, base.tokenizer, out)
    else:
        export_gguf(model, base.tokenizer, base.info, out)
    print(f"wrote {out}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run cell's quantized model (gptq safetensors or gguf)")
    p.add_argument("format", choices=["gptq", "gguf"])
    p.add_argument("run_cell", help="RUN_DIR:CELL")
    p.add_argument("out", help="output directory (gptq) or .gguf file (gguf)")
    p.add_argument("--model", help="model name when the run has several")
    p.set_defaults(fn=cmd_export)
