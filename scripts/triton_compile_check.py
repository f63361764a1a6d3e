"""Compile every Triton kernel config for a GPU target on a machine without one (ptxas ships with triton).

    .venv/bin/python scripts/triton_compile_check.py [--arch 90] [--only w4a16]

For each kernel and each of its autotune configs this builds the kernel for ``sm_<arch>`` the way
the JIT would on the GPU (pointer arguments 16-byte aligned, unit strides specialized to 1, sizes
divisible by 16) and prints the shared memory, registers and spill stack per thread.  A config over
the shared-memory limit (227 KiB on sm_90) would be skipped by the autotuner; a kernel none of
whose configs fit, or that does not compile, fails the check (exit status 1).  The CPU tests run
the kernels only under ``TRITON_INTERPRET=1``, which checks none of this.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
UNIT_STRIDES = {"stride_ak", "stride_bk", "stride_cn", "stride_qn", "stride_sn", "stride_zn", "stride_xk",
                "stride_pk", "stride_yn"}  # fmt: skip
DIV16 = {"N", "K", "stride_am", "stride_qk", "stride_sg", "stride_zg", "stride_cm", "stride_bn", "stride_xm",
         "stride_pn", "stride_ym", "s_qb", "s_qh", "s_kb", "s_kh", "s_kt", "s_sb", "s_sh", "s_st", "stride_wk",
         "stride_wn"}  # fmt: skip


def resources(cubin: bytes) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"regs {m.group(1)}, spill stack {m.group(2)} B" if m else ""


def compile_one(fn: Any, ptrs: dict[str, str], meta: dict[str, Any], warps: int, stages: int, arch: int) -> Any:
    consts = {k: v for k, v in meta.items() if v is not None}  # None: a unit stride that is not one here
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in UNIT_STRIDES and meta.get(name, 1) is not None:
            consts[name] = 1
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def kernel_sets() -> list[tuple[str, Any, dict[str, str], list[Any], dict[str, Any]]]:
    from quantbench.kernels import triton_gemv as gv
    from quantbench.kernels import triton_int8 as i8
    from quantbench.kernels import triton_kv_attention as kv
    from quantbench.kernels import triton_ternary as tern
    from quantbench.kernels import triton_w4a16 as w4

    w4p = dict(a_ptr="fp16", qw_ptr="i32", s_ptr="fp16", qz_ptr="i32", g_ptr="i32", perm_ptr="i32",
               bias_ptr="fp16", c_ptr="fp16", ws_ptr="fp32", cnt_ptr="i32")  # fmt: skip
    w4f = dict(BITS=4, HAS_BIAS=False, F32_DOT=False, COMPACT=True, REDUCE=2)
    i8p = dict(a_ptr="i8", b_ptr="i8", xs_ptr="fp32", ws_ptr="fp32", bias_ptr="fp32", c_ptr="fp16", wk_ptr="fp32",
               cnt_ptr="i32")  # fmt: skip
    tp = dict(x_ptr="fp16", p_ptr="u8", s_ptr="fp32", as_ptr="fp32", y_ptr="fp16", ws_ptr="fp32", cnt_ptr="i32")
    tf = dict(SCALE_PER_N=False, HAS_A_SCALE=False, INT8_ACT=False, DOT_FP32=False, REDUCE=2)
    kvp = dict(Q="fp32", KC="u8", KS="fp32", KZ="fp32", VC="u8", VS="fp32", VZ="fp32", PO="fp32", PL="fp32")
    one = [triton.Config({}, num_warps=4, num_stages=3)]
    gvp = dict(x_ptr="fp16", perm_ptr="i32", w_ptr="i32", s_ptr="fp16", z_ptr="i32", bias_ptr="fp16", c_ptr="fp16",
               ws_ptr="fp32", cnt_ptr="i32")  # fmt: skip
    gvf = dict(BITS=4, GS=128, ZERO_C=-1, SCALE_MODE=0, A_PERM=False, HAS_BIAS=False, MAGIC=True, REDUCE=2,
               stride_wn=1)  # fmt: skip
    kvf = dict(H_Q=32, H_KV=8, D=128, GROUP=32, BITS=4, BLOCK_T=64, BLOCK_H=16, DOT_PREC="tf32x3")
    return [
        ("w4a16 decode sorted", w4._w_int_matmul_kernel, w4p, w4._fit_block_k(w4._DECODE_CONFIGS, GS=128),
         dict(w4f, GS=128, A_PERM=False)),
        ("w4a16 decode act-order", w4._w_int_matmul_kernel, w4p, w4._fit_block_k(w4._DECODE_CONFIGS, GS=128),
         dict(w4f, GS=128, A_PERM=True)),
        ("w4a16 decode gather", w4._w_int_matmul_kernel, w4p, w4._DECODE_CONFIGS, dict(w4f, GS=0, A_PERM=False)),
        ("w4a16 decode atomic", w4._w_int_matmul_kernel, dict(w4p, c_ptr="fp32"), w4._DECODE_CONFIGS[:1],
         dict(w4f, GS=128, A_PERM=False, REDUCE=1)),
        ("w4a16 mid", w4._w_int_matmul_kernel, w4p, w4._fit_block_k(w4._MID_CONFIGS, GS=128),
         dict(w4f, GS=128, A_PERM=False, REDUCE=0)),
        ("w4a16 dequant sorted", w4._dequant_kernel, dict(qw_ptr="i32", s_ptr="fp16", qz_ptr="i32", g_ptr="i32",
         perm_ptr="i32", w_ptr="fp16"), [triton.Config(dict(BLOCK_W=16, BLOCK_N=128), num_warps=4)],
         dict(BITS=4, GS=128, PERM=True)),
        ("w4a16 dequant gather", w4._dequant_kernel, dict(qw_ptr="i32", s_ptr="fp16", qz_ptr="i32", g_ptr="i32",
         perm_ptr="i32", w_ptr="fp16"), [triton.Config(dict(BLOCK_W=16, BLOCK_N=128), num_warps=4)],
         dict(BITS=4, GS=0, PERM=False)),
        ("gemv gptq w4 sorted", gv._packed_gemv_kernel, gvp, gv._prune(gv._CONFIGS, GS=128, BITS=4), gvf),
        ("gemv gptq w4 act-order", gv._packed_gemv_kernel, gvp, gv._prune(gv._CONFIGS, GS=128, BITS=4),
         dict(gvf, A_PERM=True)),
        ("gemv gptq w4 no magic", gv._packed_gemv_kernel, gvp, gv._prune(gv._CONFIGS[:1], GS=128, BITS=4),
         dict(gvf, MAGIC=False)),
        ("gemv ternary", gv._packed_gemv_kernel, dict(gvp, s_ptr="fp32", z_ptr="fp32", bias_ptr="fp32"),
         gv._prune(gv._CONFIGS, BITS=2), dict(gvf, BITS=2, GS=gv.ONE_GROUP, ZERO_C=1, SCALE_MODE=1, stride_wn=None,
         stride_wk=1)),
        ("ternary dequant", tern._ternary_dequant_kernel, dict(p_ptr="u8", s_ptr="fp32", w_ptr="fp16"),
         [triton.Config(dict(BLOCK_N=32, BLOCK_B=64), num_warps=4)], dict(SCALE_PER_N=False)),
        ("int8 decode", i8._int8_matmul_kernel, i8p, i8._DECODE_CONFIGS, dict(HAS_BIAS=True, REDUCE=2)),
        ("int8 decode atomic", i8._int8_matmul_kernel, dict(i8p, c_ptr="fp32"), i8._DECODE_CONFIGS[:1],
         dict(HAS_BIAS=True, REDUCE=1)),
        ("int8 large", i8._int8_matmul_kernel, i8p, i8._LARGE_CONFIGS, dict(HAS_BIAS=False, REDUCE=0)),
        ("ternary decode", tern._ternary_gemm_kernel, tp, tern._DECODE_CONFIGS, tf),
        ("ternary large", tern._ternary_gemm_kernel, tp, tern._LARGE_CONFIGS, dict(tf, REDUCE=0)),
        ("ternary large int8", tern._ternary_gemm_kernel, dict(tp, x_ptr="i8", y_ptr="fp32"), tern._LARGE_CONFIGS,
         dict(tf, INT8_ACT=True, HAS_A_SCALE=True, REDUCE=0)),
        ("kv decode split", kv._kv_decode_split_kernel, kvp, one, kvf),
        ("kv decode split fp16 scales", kv._kv_decode_split_kernel,
         dict(kvp, KS="fp16", KZ="fp16", VS="fp16", VZ="fp16"), one, kvf),
        ("kv decode merge", kv._kv_decode_merge_kernel, dict(PO="fp32", PL="fp32", O="fp32"), one,
         dict(H_Q=32, D=128, SPLITS_P2=64)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--only", help="substring of the kernel-set names")
    args = ap.parse_args(argv)
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    bad = 0
    for name, fn, ptrs, configs, flags in kernel_sets():
        if args.only and args.only not in name:
            continue
        fits = 0
        for c in configs:
            label = f"{name} {c.kwargs} w{c.num_warps} s{c.num_stages}"
            try:
                k = compile_one(fn, ptrs, {**c.kwargs, **flags}, c.num_warps, c.num_stages, args.arch)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                print(f"FAIL {label}: {type(e).__name__}: {' | '.join(str(e).strip().splitlines()[-4:])[:400]}")
                continue
            smem = k.metadata.shared
            fits += smem <= limit
            flag = "OK  " if smem <= limit else "SMEM"
            print(f"{flag} {label}: shared {smem / 1024:.0f} KiB, {resources(k.asm['cubin'])}", flush=True)
        if not fits:
            print(f"ERROR {name}: no config compiles within {limit // 1024} KiB of shared memory")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
