"""Subcommands that live beside the feature they drive (export, compare, baseline, sensitivity, ...).

Each module listed in :data:`COMMAND_MODULES` defines ``add_command(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

COMMAND_MODULES = [
    "quantbench.harness.run.export",
    "quantbench.harness.report.compare",
    "quantbench.harness.tools.sensitivity",
    "quantbench.harness.tools.gpu_check",
]


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # feature not present in this build
                continue
            raise
        mod.add_command(sub)
