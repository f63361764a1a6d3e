"""quantbench: a benchmark and evaluation harness for LLM quantization.

The checkout's root is the ``quantbench`` package (pyproject maps it): ``harness/``, ``methods/`` and
``kernels/`` are its subpackages, so the relative imports between them resolve from the tree alone.

The Python API (``harness/api.py``) is re-exported here lazily, so ``import quantbench.kernels.x`` stays light::

    import quantbench as qb
    model, tok = qb.load_model("tiny-llama")

``qb.methods`` is also the name of the ``methods`` subpackage: that package object is callable, and calling
it is ``quantbench.harness.api.methods()`` (the registered methods and their descriptions).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__version__ = "0.1.0"

#: the names of ``quantbench.harness.api`` this package re-exports (loaded on first use)
API = ("load_model", "calibration", "quantize", "evaluate", "run", "methods", "metrics", "records_frame", "save",
       "load")
__all__ = ["__version__", *API]


def _api() -> Any:
    return importlib.import_module(".harness.api", __name__)


class _CallablePackage(types.ModuleType):
    """The ``methods`` subpackage, callable as ``qb.methods()`` (the API function of the same name)."""

    def __call__(self) -> dict[str, str]:
        return dict(_api().methods())


from . import methods  # noqa: E402  (an empty package __init__: light)

methods.__class__ = _CallablePackage


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(_api(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
