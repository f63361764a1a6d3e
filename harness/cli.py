"""The `quantbench` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import yaml

from ..methods.base import METHODS, ConfigError
from .inputs.data import DATASETS
from .inputs.models import MODELS
from .measure import METRICS
from .paths import SUITES_DIR
from .report import compare, publish
from .report.leaderboard import (
    check_parquet,
    load_runs,
    markdown,
    parse_formats,
    provenance_footer,
    run_records_path,
    write_data,
    write_report,
)
from .run import export
from .run.ray_executor import run_suite_ray
from .run.records import read_records
from .run.runner import run_suite
from .run.suite import cell_filter, load_suite, preflight_suite, with_batch_size, with_models
from .tools import gpu_check, sensitivity

log = logging.getLogger("quantbench")

def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a usage error is one ``error: ...`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def seed_int(text: str) -> int:
    """An argparse type: a seed torch and numpy accept (0 .. 2**32 - 1), as a suite's ``seed`` is checked."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is 0 .. 2**32 - 1, got {text!r}")
    return n


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def cmd_validate(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    pairs = len(suite.expand())
    shape = f"{len(suite.models)} model(s) x {len(suite.cells)} cell(s)"
    if pairs != len(suite.models) * len(suite.cells):  # cells with a models: list run on some models only
        shape += f", {pairs} model-cell pairs"
    print(f"{suite.path}: ok — {shape}, metrics: {', '.join(suite.metrics)}")
    return 0


def _model_arg(text: str) -> object:
    """``--model``: a model string, or a flow mapping as a suite writes one (``{random: llama, hidden_size: 1024}``)."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--model {text!r}: not a YAML mapping ({_one_line(e)})") from None


def cmd_run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)  # validated before any work starts
    if args.model or args.dtype or args.device:
        models = [_model_arg(m) for m in args.model] if args.model else None
        suite = with_models(suite, models, args.dtype, args.device)
    if args.batch_size:
        suite = with_batch_size(suite, args.batch_size)
    for problem in preflight_suite(suite):  # devices exist and hub ids resolve, before any work
        log.warning("recorded unavailable without running (a known limit of the method): %s", problem)
    _threads(args.threads)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if args.force and not args.resume:
        raise ConfigError("--force applies to --resume (rerun the cells whose definition changed)")
    cells = cell_filter(args.cells.split(",") if args.cells else [])
    executor = getattr(args, "executor", None) or suite.executor.name
    if executor == "ray":
        run_dir = run_suite_ray(suite, Path(args.out) if args.out else None, args.resume, args.seed, args.limit,
                                cells, address=args.address, force=args.force)
    else:
        run_dir = run_suite(suite, Path(args.out) if args.out else None, args.resume, args.seed, args.limit,
                            cells, force=args.force)
    path = write_report([run_dir])
    publish.render_extras([run_dir])
    recs = read_records(run_dir / "records.jsonl")
    print(markdown(recs, f"{suite.name}"))
    print(provenance_footer([run_dir]))
    print(f"\nrecords: {run_dir / 'records.jsonl'}\nleaderboard: {path}")
    return 1 if any(r["status"] == "failed" for r in recs) and args.strict else 0


def cmd_report(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format)
    if "parquet" in formats:
        check_parquet()  # before anything is written
    for d in args.run_dirs:  # every input exists and holds records before anything is written
        run_records_path(d)
    recs = load_runs(args.run_dirs)  # run directories or records/baseline .jsonl files
    written: list[Path] = []
    if "md" in formats:
        written.append(write_report(args.run_dirs, args.out))
    if "html" in formats:
        written += publish.render_extras(args.run_dirs, args.out)["html"]
    if set(formats) & {"csv", "parquet", "json"}:
        first = Path(args.run_dirs[0])
        written += write_data(recs, args.out or (first if first.is_dir() else first.parent), formats)
    if "md" in formats:
        print(markdown(recs))
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    what = args.what
    if what == "methods":
        for name, cls in METHODS.items():
            params = ", ".join(cls.config_cls.param_names())
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} [{params}]\n{'':14s} {doc}")
    elif what == "metrics":
        for name, spec in sorted(METRICS.items(), key=lambda kv: kv[1].order):  # leaderboard column order
            hib = {True: "higher is better", False: "lower is better", None: ""}[spec.higher_is_better]
            print(f"{name:22s} {spec.unit:12s} {hib}")
    elif what == "datasets":
        for name, c in DATASETS.items():
            print(f"{name:10s} splits: {', '.join(c.splits):12s} {c.description} ({c.licence})")
    elif what == "models":
        for name, fn in MODELS.items():
            print(f"{name:14s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        print("or any HF causal-LM directory, .gguf file or hub id org/name (a string, or {name, path, dtype, "
              "device}), or {random: FAMILY, hidden_size: N} (llama, qwen2, mistral, gemma3, opt, phi3)")
    elif what == "suites":
        for p in sorted(SUITES_DIR.glob("*.yaml")):
            print(p.relative_to(SUITES_DIR.parent))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantbench", description="Benchmark harness for LLM quantization")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a suite")
    r.add_argument("suite")
    r.add_argument("--out", help="run directory (default results/runs/<UTC time>-<suite>); a new run refuses "
                   "a directory that already holds one")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out: skip the cells whose every metric is recorded ok")
    r.add_argument("--force", action="store_true",
                   help="with --resume: rerun the cells whose definition changed in the suite (else refused)")
    r.add_argument("--seed", type=seed_int)
    r.add_argument("--limit", type=positive_int, help="cap on evaluation windows (and task examples) per cell")
    r.add_argument("--cells", help="comma-separated glob patterns of cell names to run")
    r.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    r.add_argument("--executor", choices=["local", "ray"], help="default: the suite's executor.name, else local")
    r.add_argument("--address", help="Ray cluster address (with --executor ray)")
    r.add_argument("--strict", action="store_true", help="exit 1 if any cell failed")
    r.add_argument("--model", action="append", metavar="MODEL",
                   help="replaces the suite's models (repeatable): an embedded name, an HF directory, a .gguf file "
                        "or a hub id org/name")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load every model in this dtype "
                   "(default: each model's own, else float32)")
    r.add_argument("--device", help="cpu, cuda, cuda:N or auto: load and run every model there (default: each "
                   "model's own, else cpu)")
    r.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="perplexity/KL windows per forward pass (default: the suite's eval batch_size, else 1); "
                        "changes no value beyond float rounding, so --resume accepts another one")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="validate a suite without running it")
    v.add_argument("suite")
    v.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list registered things")
    ls.add_argument("what", choices=["methods", "metrics", "datasets", "models", "suites"])
    ls.set_defaults(fn=cmd_ls)

    rep = sub.add_parser("report", help="leaderboard of one or more run directories")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="output directory (default: the first run directory)")
    rep.add_argument("--format", action="append", metavar="FMT",
                     help="md, html, csv, parquet, json or all; repeat or comma-separate (default: md,html). "
                          "csv/parquet/json write leaderboard_tidy.* (one row per model x cell x metric x "
                          "protocol) and leaderboard_wide.* (one row per model x cell)")
    rep.set_defaults(fn=cmd_report)

    for feature in (export, compare, sensitivity, gpu_check):  # subcommands that live beside their feature
        feature.add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # offline mode is the user's choice (HF_HUB_OFFLINE)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    # user errors (bad input, paths, files) are one line and exit 2; anything else is a bug and keeps its traceback
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, OSError) as e:  # OSError: a path that cannot be read or written (FileExistsError, ...)
        log.debug("user error", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept (continue with --resume --out RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
