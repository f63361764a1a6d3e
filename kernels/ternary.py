"""Ternary (BitNet b1.58) and binary weight storage, int8 per-token activations, CPU ternary matmul.

Packed formats (codes ``c`` in {-1, 0, +1}, one row per output channel, packed along the input dim):

- ``"2bit"``: 4 codes per byte, ``c + 1`` in 2 bits, code ``k`` of a row at bits ``2 * (k % 4)`` of byte
  ``k // 4`` (little end first; the value 3 is never written).  Rows are padded with code 0.
- ``"base3"``: 5 codes (trits) per byte, byte = sum_i (c_i + 1) * 3**i for i = 0..4 (at most 242):
  8 / 5 = 1.6 bits per weight.
- ``"1bit"`` (BitNet, binary {-1, +1}): 8 codes per byte, bit ``k % 8`` of byte ``k // 8`` set for +1.

Activations are quantized to int8 per token with absmax scaling, ``Q_b = 127 / max|x|``:
``x_q = clamp(round(x * Q_b), -128, 127)``, and the linear output is
``y = (x_q @ c^T) * gamma / Q_b``.

CPU matmul over the codes (``ternary_matmul``, all exact on integer codes).  Measured on this 2-core
CPU, 1 thread, M = 1 (decode), median ms per call, including the activation quantization and, for the
packed rows, unpacking the 2-bit buffer on every call (see ``tests/benchmarks/test_bench_ternary.py``)::

    shape (in x out)   fp32 F.linear  bf16 F.linear  int_mm(cached int8)  add/sub(gather)  bf16 dequant
    576 x 1536         0.070          0.083          0.067                2.23             0.338   (unpack+int_mm: 1.96)
    1536 x 576         0.062          0.081          0.077                2.11             0.334   (unpack+int_mm: 1.73)
    2048 x 2048        0.348          0.432          0.249               10.3              1.75    (unpack+int_mm: ~50)

``"int_mm"`` (``torch._int_mm`` on int8 activations x int8 codes, int32 accumulation) is the fastest
exact formulation and is the packed path; the add/subtract formulation (sum of the activations at the
+1 positions minus those at the -1 positions, a gather) moves more memory than it saves in multiplies
on a CPU; bf16 dequantization pays for the conversion on every call.  Unpacking the 2-bit buffer on
every call costs more than the matmul itself, so :class:`~quantbench.methods.bitnet.TernaryLinear`
keeps a lazily built int8 copy of its codes (``cache_codes=True``, the default; the 2-bit buffer is
what is stored and counted) — the same trade as the int4pack CPU path — for prefill.  Decode (at most
:data:`PACKED_GEMV_MAX_ROWS` tokens) reads the 2-bit codes themselves in ``kernels/ternary_cpu.cpp``
(AVX-512 VNNI ``vpdpbusd`` on the unsigned fields ``c + 1`` against the int8 activations, minus their sum;
exact): pytest-benchmark, 1 thread, TernaryLinear at M = 1 (activation quantization included), median us:
576 x 1536 62.4 (int_mm 76.9), 1536 x 576 58.1 (80.0), 2048 x 2048 111.5 (262.7).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .cpp import load_cpp_ops, loaded_cpp_ops

FORMATS = ("2bit", "base3", "1bit")
CODES_PER_BYTE = {"2bit": 4, "base3": 5, "1bit": 8}
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


# --------------------------------------------------------------------------- packing


def _pad_cols(codes: torch.Tensor, per: int, fill: int) -> torch.Tensor:
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = F.pad(codes, (0, pad), value=fill)
    return codes


def pack_ternary(codes: torch.Tensor, fmt: str = "2bit") -> torch.Tensor:
    """Pack integer codes [..., n] (values in {-1, 0, 1}, or {-1, 1} for ``"1bit"``) into uint8 [..., ceil(n/per)]."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ternary format {fmt!r}; valid: {FORMATS}")
    c = codes.to(torch.int32)
    lo = -1
    if c.numel() and (c.min() < lo or c.max() > 1 or (fmt == "1bit" and bool((c == 0).any()))):
        raise ValueError(f"codes out of range for {fmt}")
    per = CODES_PER_BYTE[fmt]
    if fmt == "2bit":
        u = _pad_cols(c + 1, per, 1)
        u = u.reshape(*u.shape[:-1], -1, per)
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=c.device)
        return (u << shifts).sum(-1).to(torch.uint8)
    if fmt == "base3":
        u = _pad_cols(c + 1, per, 1)
        u = u.reshape(*u.shape[:-1], -1, per)
        return (u * _POW3.to(c.device)).sum(-1).to(torch.uint8)
    u = _pad_cols((c > 0).to(torch.int32), per, 1)
    u = u.reshape(*u.shape[:-1], -1, per)
    shifts = torch.arange(8, dtype=torch.int32, device=c.device)
    return (u << shifts).sum(-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int, fmt: str = "2bit") -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes [..., n]."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ternary format {fmt!r}; valid: {FORMATS}")
    p = packed.to(torch.int32).unsqueeze(-1)
    if fmt == "2bit":
        shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=p.device)
        u = ((p >> shifts) & 3) - 1
    elif fmt == "base3":
        u = (p // _POW3.to(p.device)) % 3 - 1
    else:
        shifts = torch.arange(8, dtype=torch.int32, device=p.device)
        u = ((p >> shifts) & 1) * 2 - 1
    return u.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int8)


def packed_cols(n: int, fmt: str) -> int:
    return -(-n // CODES_PER_BYTE[fmt])


# --------------------------------------------------------------------------- activations


def act_quant_int8(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: returns (x_q int8 [..., K], Q_b fp32 [..., 1]) with Q_b = 127 / max|x|."""
    xf = x.float()
    qb = 127.0 / xf.abs().amax(-1, keepdim=True).clamp(min=eps)
    xq = (xf * qb).round().clamp(-128, 127).to(torch.int8)
    return xq, qb


# --------------------------------------------------------------------------- matmul over codes


def reference_ternary_matmul(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Ground truth: int64 x_q [M, K] @ codes [N, K]^T -> int64 [M, N] (exact)."""
    return xq.to(torch.int64) @ codes.to(torch.int64).T


def int_mm_ternary(xq: torch.Tensor, codes_t: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` int8 [M, K] x int8 codes^T [K, N] -> int32 [M, N]."""
    return torch._int_mm(xq.contiguous(), codes_t)


def addsub_index(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the input positions of +1 and of -1 codes, padded with K (a zero slot)."""
    n, k = codes.shape

    def idx(mask: torch.Tensor) -> torch.Tensor:
        cnt = int(mask.sum(1).max().item()) if n else 0
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :cnt]
        valid = torch.gather(mask, 1, order)
        return torch.where(valid, order, torch.full_like(order, k))

    return idx(codes > 0), idx(codes < 0)


def addsub_ternary(xq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Add/subtract formulation: y[m, n] = sum_{k: c=+1} x[m, k] - sum_{k: c=-1} x[m, k] (int32)."""
    xe = F.pad(xq.to(torch.int32), (0, 1))  # slot K is zero
    return xe[:, pos].sum(-1) - xe[:, neg].sum(-1)


def dequant_bf16_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 dequantized matmul: F.linear(x, codes * scale) in bf16."""
    w = codes.to(torch.bfloat16) * scale.to(torch.bfloat16).view(-1, 1)
    return F.linear(x.to(torch.bfloat16), w)


def ternary_linear(
    x: torch.Tensor,
    codes_t: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int | None = 8,
) -> torch.Tensor:
    """Packed-path linear over int8 codes^T [K, N] and per-tensor ([1]) or per-channel ([N]) scales.

    With ``act_bits=8`` the activations are quantized per token and the product runs in int8 ->
    int32 (``torch._int_mm``); with ``act_bits=None`` the codes are used as fp weights.
    """
    if act_bits == 8:
        return _int8_linear(x, lambda xq: int_mm_ternary(xq, codes_t), codes_t.shape[1], scale, bias)
    shape = x.shape
    y = (x.reshape(-1, shape[-1]).float() @ codes_t.float()) * scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], codes_t.shape[1])


#: products with at most this many rows (tokens: decode) read the 2-bit codes in ``kernels/ternary_cpu.cpp``;
#: longer ones (prefill) multiply the cached int8 codes with ``torch._int_mm``.  Both are exact (int32 sums).
PACKED_GEMV_MAX_ROWS = 4
_SOURCE = "ternary_cpu.cpp"


def load_ternary_cpu_kernel() -> bool:
    """Build (once; then torch's extension cache) the 2-bit CPU kernel and register its shape function for
    ``torch.compile``; False where it cannot be built (no compiler): :func:`ternary_linear` remains."""
    if loaded_cpp_ops(_SOURCE) is not None:
        return True
    mod = load_cpp_ops(_SOURCE, "quantbench_ternary", "QB_TERNARY_NS")
    if mod is None:
        return False

    @torch.library.register_fake(f"{mod.name}::ternary_mm_2bit")
    def _(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], packed.shape[0]), dtype=torch.int32)

    return True


def packed_gemv_applies(x: torch.Tensor) -> bool:
    """Whether :func:`ternary_linear_2bit` serves ``x`` [..., K]: a CPU tensor of at most
    :data:`PACKED_GEMV_MAX_ROWS` rows, with the kernel built (:func:`load_ternary_cpu_kernel`; this never builds)."""
    return (x.device.type == "cpu" and x.numel() <= PACKED_GEMV_MAX_ROWS * x.shape[-1]
            and loaded_cpp_ops(_SOURCE) is not None)


def ternary_mm_2bit(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """int8 activations [M, K] x 2-bit packed codes [N, ceil(K/4)] ("2bit" format) -> int32 [M, N], equal to
    ``torch._int_mm(xq, codes^T)`` (the kernel must be loaded: :func:`load_ternary_cpu_kernel`)."""
    return loaded_cpp_ops(_SOURCE).ternary_mm_2bit(xq, packed)


def ternary_linear_2bit(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ternary_linear` with int8 activations read straight from the 2-bit packed codes [N, ceil(K/4)] (no
    int8 copy of the codes: a quarter of the bytes per decode step); the same numbers bit for bit."""
    return _int8_linear(x, lambda xq: ternary_mm_2bit(xq, packed), packed.shape[0], scale, bias)


def _int8_linear(x: torch.Tensor, mm: Any, n: int, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-token int8 activations of ``x`` through the integer product ``mm`` (int8 [M, K] -> int32 [M, n]), then
    the per-tensor or per-channel ``scale``, the activation scale and ``bias``."""
    shape = x.shape
    xq, qb = act_quant_int8(x.reshape(-1, shape[-1]))
    y = mm(xq).float() * (scale.float().view(1, -1) / qb)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], n)


class TernaryPackedWeight(Protocol):
    """The packed ternary weight the Triton kernel reads (``methods.bitnet.TernaryLinear`` is one):
    ``qweight`` codes in the ``fmt`` layout ("2bit", "base3" or "1bit"), fp32 ``scale`` per tensor,
    channel or group (``granularity``), optional ``bias``; ``act_bits`` 8 quantizes activations per token."""

    out_features: int
    fmt: str
    granularity: str
    act_bits: int | None
    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
