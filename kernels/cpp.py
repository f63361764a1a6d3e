"""Building the project's C++ CPU operators (``kernels/*.cpp``) with ``torch.utils.cpp_extension``."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_BUILT: dict[str, Any] = {}


def load_cpp_ops(source: str, prefix: str, macro: str) -> Any:
    """The operators of ``kernels/<source>`` as ``torch.ops.<prefix>_<hash>``, built on first use (then loaded from
    torch's extension cache), or None where they cannot be built (no compiler): callers keep their torch paths.
    The build is keyed by the source, the torch installation (two virtual environments have different include
    paths, and would rebuild each other's) and this CPU's flags (``-march=native``); the source registers its
    operators in the namespace the ``macro`` define names, so two builds never clash in one process.  It compiles
    a copy of the source kept in torch's build folder: ninja rebuilds when a source's path changes, and each
    checkout of the same code would otherwise pay the ~20-30 s compile again."""
    if source in _BUILT:
        return _BUILT[source]
    mod = None
    try:
        from torch.utils import cpp_extension

        src = Path(__file__).with_name(source)
        code = src.read_bytes()
        h = hashlib.sha256(code)
        h.update(str(Path(torch.__file__).parent).encode())  # each environment its own build (its own include paths)
        try:
            h.update(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).encode())
        except (OSError, StopIteration):
            pass
        name = f"{prefix}_{h.hexdigest()[:12]}"
        flags = ["-O3", "-march=native", "-fopenmp-simd", f"-D{macro}={name}"]
        build_dir = getattr(cpp_extension, "_get_build_directory", None)  # torch's own folder for ``name``
        copy, build = src, None
        if build_dir is not None:
            build = Path(build_dir(name, False))
            copy = build / source
            if not copy.exists() or copy.read_bytes() != code:
                tmp = build / f"{source}.tmp-{os.getpid()}"
                tmp.write_bytes(code)
                os.replace(tmp, copy)  # whole or absent, for a concurrent build
        cpp_extension.load(name, [str(copy)], extra_cflags=flags, build_directory=None if build is None else str(build),
                           is_python_module=False, verbose=False)
        mod = getattr(torch.ops, name)
    except Exception as e:  # noqa: BLE001 - any build failure: the torch paths remain
        log.warning("C++ CPU operators of %s unavailable (%s); using the torch paths", source, e)
    _BUILT[source] = mod
    return mod


def loaded_cpp_ops(source: str) -> Any:
    """The operators of ``kernels/<source>`` if :func:`load_cpp_ops` has built them in this process, else None
    (never builds)."""
    return _BUILT.get(source)
