"""FP4 (E2M1) elements and the two block-scaled FP4 formats built on them: OCP MXFP4 and NVIDIA NVFP4.

Pure-torch references on plain tensors; blocks run along the last dimension, which must be a multiple
of the block size (no padding).  Inputs must be finite (a NaN or an infinity is a ``ValueError``).

**E2M1** (the FP4 element type of the OCP Microscaling Formats (MX) v1.0 spec): a 4-bit code is
``s eem`` (bit 3 the sign, bits 2-1 the exponent with bias 1, bit 0 the mantissa); exponent 0 is
subnormal.  The eight magnitude codes ``0..7`` are ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` in order, so a
magnitude's code is its index in :data:`E2M1_VALUES`.  There is no infinity or NaN.
:func:`encode_e2m1` rounds to nearest, a tie going to the code with an even mantissa (0.25 -> 0,
0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and saturates: every magnitude above 6
gives 6.  The sign is the input's sign bit, so -0.0 and small negatives that round to zero give code 8 (-0).

**Packing**: two codes per byte along the last dimension, element ``2i`` in the low nibble (bits 0-3)
and element ``2i + 1`` in the high nibble (bits 4-7): the layout of NVIDIA's ``fp4x2`` storage.

**MXFP4** (the OCP MX spec's conversion to MX): blocks of :data:`MX_BLOCK` = 32 elements share one
E8M0 scale, a power of two ``X = 2^(floor(log2(amax)) - 2)`` (2 is E2M1's largest exponent), stored as
its biased exponent ``floor(log2(amax)) - 2 + 127`` in a uint8, clamped to [0, 254] (255 is E8M0's
NaN).  ``amax / X`` lies in [4, 8) (unless the clamp applies), so the block's largest elements
saturate at 6.  An all-zero block gets code 0 (2^-127).  Elements are ``encode_e2m1(x / X)``;
dequantized ``decode_e2m1(code) * X``.  4.25 bits per element.

**NVFP4**: blocks of :data:`NV_BLOCK` = 16 elements share a float8_e4m3fn scale, with one float32
scale per tensor: ``global = amax_tensor / (448 * 6)`` and ``block = fp8(amax_block / 6 / global)``
(at most 448, so it fits E4M3; torch's round-to-nearest cast, E4M3 subnormals included).  The
effective scale is ``s = float32(block) * global``; elements are ``encode_e2m1(x / s)`` (0 where ``s``
is 0) and dequantized ``decode_e2m1(code) * s``.  4.5 bits per element plus 32 bits per tensor.
``global_scale`` may be given (any shape broadcasting against ``x[..., :1]``, e.g. one per row for
per-token activations); by default it is computed over all of ``x``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .intq import take_rows

#: E2M1 magnitudes by magnitude code (0..7); code | 8 is the negative
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
#: E2M1's largest exponent (6 = 1.5 * 2^2): MX scales map a block's amax into [2^2, 2^3)
E2M1_EMAX = 2
#: midpoints between consecutive magnitudes; a tie rounds to the even code
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

MX_BLOCK = 32
E8M0_BIAS = 127
E8M0_MAX_CODE = 254  # 255 encodes NaN

NV_BLOCK = 16
E4M3_MAX = 448.0


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: the input has a NaN or an infinity")


def _check_blocks(x: torch.Tensor, block: int, what: str) -> None:
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{what}: the last dimension ({tuple(x.shape)}) must be a multiple of {block}")


# --------------------------------------------------------------------------- E2M1 elements


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of ``x``: round to nearest, ties to even mantissa, saturating at ±6."""
    a = x.float().abs()
    mid = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    down = torch.bucketize(a, mid, right=False)  # a tie counts as below its midpoint
    up = torch.bucketize(a, mid, right=True)  # a tie counts as above
    mag = torch.where(down % 2 == 0, down, up)  # they differ only on a tie: take the even code
    return (mag | (torch.signbit(x).to(torch.int64) << 3)).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes (any integer dtype, 0..15)."""
    c = codes.to(torch.int64)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per uint8 along the last dimension: element 2i low nibble, 2i + 1 high nibble."""
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: the last dimension ({tuple(codes.shape)}) must be even")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes, twice as many along the last dimension."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def decode_packed_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """``decode_e2m1(unpack_nibbles(packed))`` (float32 [..., 2 * K/2]) by one lookup per byte in a [256, 2] table
    of the two codes' values (built by :func:`decode_e2m1` itself, so equal bit for bit, -0.0 included): the
    reference forward dequantizes its weight on every call, and the elementwise decode's int64 codes, gathers
    and masks cost several times the lookup (smollm2-135m mxfp4 on the 2-core CPU, 2 threads, load ~3: a one-token
    forward 7.2 -> 0.5 s, a 256-token prefill 22.7 -> 2.2 s)."""
    dev = packed.device
    if dev not in _BYTE_TABLES:
        b = torch.arange(256, device=dev)
        _BYTE_TABLES[dev] = decode_e2m1(torch.stack((b & 0xF, b >> 4), -1)).contiguous()
    p = packed.to(torch.uint8)
    return take_rows(_BYTE_TABLES[dev], p).reshape(*p.shape[:-1], 2 * p.shape[-1])


# --------------------------------------------------------------------------- MXFP4


class MXFP4Tensor(NamedTuple):
    """``codes`` uint8 [..., K/2] (two E2M1 codes a byte), ``exponents`` uint8 [..., K/32] (E8M0)."""

    codes: torch.Tensor
    exponents: torch.Tensor


def mx_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 biased exponents (uint8) of the scales ``2^(floor(log2(amax)) - 2)``; 0 for ``amax == 0``."""
    _, e = torch.frexp(amax.float())  # amax = m * 2^e with m in [0.5, 1): floor(log2(amax)) = e - 1
    biased = (e.to(torch.int32) - 1 - E2M1_EMAX + E8M0_BIAS).clamp(0, E8M0_MAX_CODE)
    return torch.where(amax > 0, biased, torch.zeros_like(biased)).to(torch.uint8)


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """The powers of two ``2^(code - 127)`` of E8M0 codes 0..254, exactly, as float32 (code 0 is subnormal)."""
    b = exponents.to(torch.int32)
    bits = torch.where(b > 0, b << 23, torch.full_like(b, 1 << 22))
    return bits.view(torch.float32)


def quantize_mx(x: torch.Tensor) -> MXFP4Tensor:
    """MXFP4 of ``x`` (blocks of 32 along the last dimension, a multiple of 32)."""
    _check_blocks(x, MX_BLOCK, "quantize_mx")
    _check_finite(x, "quantize_mx")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
    exponents = mx_scale_exponent(blocks.abs().amax(-1))
    codes = encode_e2m1(blocks / e8m0_to_float(exponents).unsqueeze(-1))  # a power of two: exact
    return MXFP4Tensor(pack_nibbles(codes.reshape(x.shape)), exponents)


def dequantize_mx(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """Float32 [..., K] of packed codes [..., K/2] and E8M0 exponents [..., K/32]."""
    values = decode_packed_e2m1(codes)
    k = values.shape[-1]
    blocks = values.reshape(*values.shape[:-1], k // MX_BLOCK, MX_BLOCK) * e8m0_to_float(exponents).unsqueeze(-1)
    return blocks.reshape(*values.shape)


def fake_quantize_mx(x: torch.Tensor) -> torch.Tensor:
    """``dequantize_mx(quantize_mx(x))`` in ``x``'s dtype."""
    return dequantize_mx(*quantize_mx(x)).to(x.dtype)


# --------------------------------------------------------------------------- NVFP4


class NVFP4Tensor(NamedTuple):
    """``codes`` uint8 [..., K/2], ``block_scales`` float8_e4m3fn [..., K/16], ``global_scale`` float32
    (a scalar for a tensor, [..., 1] per row)."""

    codes: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor


def nv_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The float32 per-tensor scale ``amax / (448 * 6)``; 1 where ``amax`` is 0 (all block scales are then 0)."""
    a = amax.float()
    return torch.where(a > 0, a / (E4M3_MAX * E2M1_MAX), torch.ones_like(a))


def quantize_nv(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """NVFP4 of ``x`` (blocks of 16 along the last dimension, a multiple of 16).

    ``global_scale`` defaults to :func:`nv_global_scale` of ``x``'s absolute maximum; a given one
    broadcasts against ``x[..., :1]`` (shape [] or [..., 1]).
    """
    _check_blocks(x, NV_BLOCK, "quantize_nv")
    _check_finite(x, "quantize_nv")
    xf = x.float()
    gs = nv_global_scale(xf.abs().amax()) if global_scale is None else global_scale.float()
    blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // NV_BLOCK, NV_BLOCK)
    g = gs.unsqueeze(-1)  # [] -> [1]; [..., 1] -> [..., 1, 1]: against [..., n_blocks, 16]
    block = (blocks.abs().amax(-1, keepdim=True) / E2M1_MAX / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    s = block.float() * g
    scaled = torch.where(s > 0, blocks / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(blocks))
    codes = encode_e2m1(scaled).reshape(x.shape)
    return NVFP4Tensor(pack_nibbles(codes), block.squeeze(-1), gs)


def dequantize_nv(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Float32 [..., K] of packed codes [..., K/2], E4M3 block scales [..., K/16] and the float32 global scale."""
    values = decode_packed_e2m1(codes)
    k = values.shape[-1]
    s = block_scales.float().unsqueeze(-1) * global_scale.float().unsqueeze(-1)
    return (values.reshape(*values.shape[:-1], k // NV_BLOCK, NV_BLOCK) * s).reshape(*values.shape)


def fake_quantize_nv(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_nv(quantize_nv(x, global_scale))`` in ``x``'s dtype."""
    return dequantize_nv(*quantize_nv(x, global_scale)).to(x.dtype)
