"""`quantbench sensitivity`: a per-module sensitivity map of one model (JSON + heatmap).

The measurement itself lives with the methods (:mod:`quantbench.methods.sensitivity`); this is the
command that loads a model and its windows, runs it and draws the map.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ...methods.base import ConfigError
from ...methods.sensitivity import EMBEDDINGS, LM_HEAD, sensitivity_map, summarize
from ..inputs import data as datamod
from ..inputs.models import load_model


def write_heatmap(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.array(doc["values"], dtype=float)
    size = (max(4.0, 0.9 * len(doc["projections"]) + 2), max(3.0, 0.28 * len(doc["layers"]) + 1.5))
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(np.log10(np.maximum(arr, 1e-8)), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(doc["projections"])), doc["projections"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(doc["layers"])), [str(x) for x in doc["layers"]], fontsize=7)
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="log10 KL (nats/token)")
    ax.set_title(doc.get("title", "sensitivity"), fontsize=9)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"sensitivity_heatmap.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths


def cmd_sensitivity(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    ids = datamod.tokens(args.dataset, args.split, loaded.tokenizer)
    if args.split == "calib":
        windows = datamod.sample_calibration(ids, args.windows, args.seq_len, args.seed)
    else:  # the first non-overlapping windows of the test split (the gptq protocol's windows)
        n = ids.numel() // args.seq_len
        if n < args.windows:
            raise ConfigError(f"{args.dataset}/{args.split} has only {n} windows of {args.seq_len} tokens")
        windows = ids[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    t0 = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    doc = sensitivity_map(model, windows, args.bits, args.group_size, args.metric, layers=layers)
    doc.update(
        model=loaded.info.get("name"),
        dataset=args.dataset,
        split=args.split,
        seconds=round(time.perf_counter() - t0, 1),
        summary=summarize(doc),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(doc, indent=1))
    paths = write_heatmap(doc, out)
    s = doc["summary"]
    print(
        f"sensitivity of {doc['model']} at {args.bits} bits (g{args.group_size}), "
        f"{args.windows}x{args.seq_len} tokens of {args.dataset}/{args.split}, {doc['seconds']} s"
    )
    print("mean KL by projection: " + ", ".join(f"{k} {v:.4g}" for k, v in s["mean_by_projection"].items()))
    for k in (EMBEDDINGS, LM_HEAD):
        if doc.get(k):
            print(f"{k}: KL {doc[k]['kl']:.4g}")
    print(f"wrote {out / 'sensitivity.json'}, {', '.join(str(p) for p in paths)}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity", help="per-layer, per-projection sensitivity map (KL when one module is quantized)"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dataset", default="wiki")
    p.add_argument("--split", choices=["test", "calib"], default="test")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration window sampling seed (--split calib)")
    p.add_argument("--metric", choices=["kl", "fisher"], default="kl")
    p.add_argument("--layers", help="comma-separated block indices to measure (default: all)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True, help="directory for sensitivity.json and the heatmap")
    p.set_defaults(fn=cmd_sensitivity)
