"""Low-bit integer W/A quantizers, signed int4 packing and the integer GEMM on the codes (W4A4).

Formulas (QuaRot's quantizers, Ashkboos et al., 2024):

- symmetric per row (activations per token, weights per output channel), ``b`` bits, clip ratio ``c``:
  ``xmax = c * max(|min(x, 0)|, max(x, 0))``, ``scale = xmax / (2^(b-1) - 1)`` (1 for an all-zero row),
  ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``, ``x_hat = scale * q``;
- asymmetric per group (the KV cache, group = head_dim): ``xmax = c * max``, ``xmin = c * min``,
  ``scale = (xmax - xmin) / (2^b - 1)``, ``zero = round(-xmin / scale)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``, ``x_hat = scale * (q - zero)``;
- weight clipping search (``mse=True``): the symmetric range shrunk by ``p = 1 - i / 100`` for
  ``i < 80``, the ``p`` minimising ``sum |w - w_hat|^2.4`` kept per row (the GPTQ reference quantizer's
  search, which QuaRot's ``--w_clip`` uses).

Packing: signed int4 codes two per byte along the input dimension, two's complement nibbles, the
even column in the low nibble and the odd column in the high nibble: ``byte = (q[2i] & 15) | (q[2i+1] & 15) << 4``.

GEMM: int4 activation codes x int4 weight codes, each held in int8, through
:func:`quantbench.kernels.int8mm.int8_matmul` (``torch._int_mm``, int32 accumulation, exact), then one
rescale by the per-token x per-channel scales; :func:`w4a4_matmul_reference` sums the same integer
products in float64.
"""

from __future__ import annotations

import torch

from . import int8mm
from .intq import take_rows

MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8


def qmax_sym(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def sym_scale(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Per-row symmetric scale [rows] of x [rows, k] (1 where the row is all zero)."""
    x = x.float()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xmax = torch.maximum(x.amin(-1).minimum(zero).abs(), x.amax(-1).maximum(zero)) * clip
    scale = xmax / qmax_sym(bits)
    return torch.where(xmax == 0, torch.ones_like(scale), scale)


def sym_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)`` with a per-row scale [rows]."""
    q = torch.round(x.float() / scale.unsqueeze(-1))
    return q.clamp_(-qmax_sym(bits) - 1, qmax_sym(bits)).to(torch.int8)


def quantize_per_token_sym(x: torch.Tensor, bits: int = 4, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric quantization of x [M, K]: int8 codes [M, K] and fp32 scales [M]."""
    scale = sym_scale(x, bits, clip)
    return sym_codes(x, scale, bits), scale


def fake_quantize_sym(x: torch.Tensor, bits: int = 4, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize along the last dimension (per token), in x's dtype."""
    q, s = quantize_per_token_sym(x.reshape(-1, x.shape[-1]), bits, clip)
    return (q.float() * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


def fake_quantize_asym(x: torch.Tensor, bits: int = 4, clip: float = 1.0, group: int = -1) -> torch.Tensor:
    """Asymmetric quantize-dequantize in groups of ``group`` along the last dimension (-1: all of it)."""
    shape = x.shape
    g = shape[-1] if group in (-1, 0) else group
    xg = x.float().reshape(-1, shape[-1] // g, g)
    xmax = xg.amax(-1, keepdim=True) * clip
    xmin = xg.amin(-1, keepdim=True) * clip
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    maxq = 2**bits - 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(xg / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(shape).to(x.dtype)


def weight_scale_sym(w: torch.Tensor, bits: int = 4, mse: bool = True,
                     scale_dtype: torch.dtype | None = torch.float16) -> torch.Tensor:
    """Per-output-channel symmetric scale [out] of w [out, in]; with ``mse`` the clipping search above.
    ``scale_dtype``: the stored precision; the search compares candidates rounded to it."""
    w = w.float()

    def rounded(s: torch.Tensor) -> torch.Tensor:
        return s if scale_dtype is None else s.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)

    scale = rounded(sym_scale(w, bits).clamp_min(1e-5 / qmax_sym(bits)))
    if not mse:
        return scale
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    full = scale.clone()
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        s1 = rounded(full * (1 - i / MSE_GRID))
        err = (sym_codes(w, s1, bits).float() * s1.unsqueeze(1) - w).abs_().pow_(MSE_NORM).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
    return scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed codes [N, K] in [-8, 7] (K even) -> uint8 [N, K / 2]: even column low nibble, odd high."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the packed dimension {q.shape[-1]} is odd")
    u = (q.to(torch.int16) & 15).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


_NIBBLES = torch.tensor([[(b & 15) - 16 * ((b >> 3) & 1), (b >> 4) - 16 * (b >> 7)] for b in range(256)],
                        dtype=torch.int8)  # byte -> its two signed nibbles (low, high)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes [N, 2 * K/2] in [-8, 7].  On the CPU one lookup per byte in a
    [256, 2] table (the W4A4 forward unpacks its weight every call: the elementwise form's temporaries cost
    several times the lookup); elsewhere the nibble arithmetic."""
    if p.device.type == "cpu" and p.dtype == torch.uint8:
        return take_rows(_NIBBLES, p).reshape(*p.shape[:-1], 2 * p.shape[-1])
    lo = (p & 15).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    q = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return torch.where(q >= 8, q - 16, q)


def w4a4_matmul(xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``y = x_scale[m] * w_scale[n] * sum_k xq[m, k] * wq[n, k] + bias``: the packed int4 weight unpacked
    to int8 codes, the integer GEMM on the codes (int32 accumulation), one rescale."""
    return int8mm.int8_matmul(xq, x_scale, unpack_int4(w_packed), w_scale.float(), bias, out_dtype)


def w4a4_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ground truth of :func:`w4a4_matmul`: the integer products summed exactly in float64."""
    return int8mm.int8_matmul_reference(xq, x_scale, unpack_int4(w_packed), w_scale.float(), bias, out_dtype)
