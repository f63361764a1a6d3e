"""Fetch every offline corpus and task file into the cache (``python -m quantbench.harness.inputs.prefetch``)."""

from __future__ import annotations

import importlib
import logging
import sys

from . import data

log = logging.getLogger(__name__)

#: extra fetchers registered by optional features ("module:function"), run when importable
EXTRA_FETCHERS = ["quantbench.harness.measure.tasks:prefetch"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for art in (data.WIKI, data.KJV):
        path = data.fetch_artifact(art)
        log.info("ok %s", path.name)
    for target in EXTRA_FETCHERS:
        mod, fn = target.split(":")
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        getattr(m, fn)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
