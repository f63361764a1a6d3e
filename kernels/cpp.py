"""Building the project's C++ CPU operators (``kernels/*.cpp``) with ``torch.utils.cpp_extension``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_BUILT: dict[str, Any] = {}


def load_cpp_ops(source: str, prefix: str, macro: str) -> Any:
    """The operators of ``kernels/<source>`` as ``torch.ops.<prefix>_<hash>``, built on first use (then loaded from
    torch's extension cache), or None where they cannot be built (no compiler): callers keep their torch paths.
    The build is keyed by the source and this CPU's flags (``-march=native``); the source registers its operators
    in the namespace the ``macro`` define names, so two builds never clash in one process."""
    if source in _BUILT:
        return _BUILT[source]
    mod = None
    try:
        from torch.utils import cpp_extension

        src = Path(__file__).with_name(source)
        h = hashlib.sha256(src.read_bytes())
        try:
            h.update(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).encode())
        except (OSError, StopIteration):
            pass
        name = f"{prefix}_{h.hexdigest()[:12]}"
        flags = ["-O3", "-march=native", "-fopenmp-simd", f"-D{macro}={name}"]
        cpp_extension.load(name, [str(src)], extra_cflags=flags, is_python_module=False, verbose=False)
        mod = getattr(torch.ops, name)
    except Exception as e:  # noqa: BLE001 - any build failure: the torch paths remain
        log.warning("C++ CPU operators of %s unavailable (%s); using the torch paths", source, e)
    _BUILT[source] = mod
    return mod


def loaded_cpp_ops(source: str) -> Any:
    """The operators of ``kernels/<source>`` if :func:`load_cpp_ops` has built them in this process, else None
    (never builds)."""
    return _BUILT.get(source)
