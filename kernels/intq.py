"""Uniform integer quantization grids and the GPTQ-ecosystem bit packing.

Grid (as in the GPTQ reference ``Quantizer``): asymmetric min-max gives
``scale = (max - min) / maxq`` and an integer ``zero = round(-min / scale)``;
symmetric uses ``max(|min|, max)`` and ``zero = (maxq + 1) / 2``.  Codes are
``q = clamp(round(w / scale) + zero, 0, maxq)`` and ``w_hat = scale * (q - zero)``.

Packing: codes are a little-endian bit stream along the packed dimension, 32 bits per
int32 word, which is exactly the layout of GPTQ checkpoints for 2/4/8 bits (``32 / bits``
values per word) and for 3 bits (32 values in 3 words, values straddling word edges).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


def round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` and nudged up where rounding went down, returned as float32.

    Packed layouts store scales in fp16; a scale rounded *up* keeps [min, max] on the grid, so
    round-to-nearest keeps its |w - w_hat| <= scale / 2 bound.
    """
    s = scale.to(dtype)
    low = s.float() < scale
    s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s.float()


def grid_params(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point from per-row (or per-group) min and max.

    With ``scale_dtype`` (e.g. ``torch.float16``) the scale is first rounded up to that dtype and
    the zero point computed against the rounded scale.
    """
    maxq = 2**bits - 1
    wmin = torch.minimum(wmin, torch.zeros_like(wmin))
    wmax = torch.maximum(wmax, torch.zeros_like(wmax))
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        wmin = torch.where(amax > 0, -amax, wmin)
        wmax = amax
    degenerate = (wmin == 0) & (wmax == 0)
    wmin = torch.where(degenerate, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(degenerate, torch.full_like(wmax, 1.0), wmax)
    scale = (wmax - wmin) / maxq
    if scale_dtype is not None:
        scale = round_up_to(scale, scale_dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def pack_bits(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into int32 words along ``dim`` (bit stream, LSB first).

    ``codes.shape[dim] * bits`` must be a multiple of 32.
    """
    c = codes.movedim(dim, 0).to(torch.int64)
    n = c.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words")
    if 32 % bits == 0:  # whole codes per word: shift-and-or (the bit stream below is ~10x slower)
        per = 32 // bits
        sh = (torch.arange(per, dtype=torch.int64, device=c.device) * bits).view(1, per, *([1] * (c.dim() - 1)))
        words = (c.reshape(n // per, per, *c.shape[1:]) << sh).sum(1)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.movedim(0, dim).contiguous()
    shifts = torch.arange(bits, dtype=torch.int64, device=c.device)
    bitstream = ((c.unsqueeze(1) >> shifts.view(1, bits, *([1] * (c.dim() - 1)))) & 1).reshape(n * bits, *c.shape[1:])
    words = bitstream.reshape(n * bits // 32, 32, *c.shape[1:])
    weights = (
        torch.ones(32, dtype=torch.int64, device=c.device) << torch.arange(32, dtype=torch.int64, device=c.device)
    ).view(1, 32, *([1] * (c.dim() - 1)))
    packed = (words * weights).sum(1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(0, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes along ``dim`` as int32 (values in [0, 2**bits))."""
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64, device=p.device).view(1, 32, *([1] * (p.dim() - 1)))
    bitstream = ((p.unsqueeze(1) >> shifts) & 1).reshape(p.shape[0] * 32, *p.shape[1:])[: n * bits]
    bitstream = bitstream.reshape(n, bits, *p.shape[1:])
    weights = (
        torch.ones(bits, dtype=torch.int64, device=p.device) << torch.arange(bits, dtype=torch.int64, device=p.device)
    ).view(1, bits, *([1] * (p.dim() - 1)))
    return (bitstream * weights).sum(1).to(torch.int32).movedim(0, dim).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack codes packed along dim 0; shift-and-mask for 2/4/8 bits and for 3 bits (3 words per 32 codes)."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
        return codes.reshape(packed.shape[0] * per, packed.shape[1])[:n]
    if bits == 3 and packed.shape[0] % 3 == 0:
        w = packed.view(packed.shape[0] // 3, 3, packed.shape[1]).to(torch.int64) & 0xFFFFFFFF
        lo = w[:, 0] | (w[:, 1] << 32)  # codes 0..20 whole, code 21's low bit at bit 63
        hi = w[:, 2]
        j = torch.arange(21, device=packed.device).view(1, 21, 1)
        first = (lo.unsqueeze(1) >> (3 * j)) & 7
        c21 = ((lo >> 63) & 1) | ((hi & 3) << 1)
        k = torch.arange(10, device=packed.device).view(1, 10, 1)
        last = (hi.unsqueeze(1) >> (2 + 3 * k)) & 7
        codes = torch.cat([first, c21.unsqueeze(1), last], dim=1).to(torch.int32)
        return codes.reshape(-1, packed.shape[1])[:n]
    return unpack_bits(packed, bits, n, dim=0)


class IntPackedWeight(Protocol):
    """The GPTQ-layout packed integer weight the int kernels read (``IntQuantLinear`` is one).

    ``qweight`` int32 [in * bits / 32, out] (codes packed along the input dimension), ``qzeros``
    int32 [n_groups, out * bits / 32], ``scales`` fp16 [n_groups, out], ``g_idx`` int32 [in].
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None

    def codes(self) -> torch.Tensor: ...

    def zeros(self) -> torch.Tensor: ...

    def dequantized_weight(self) -> torch.Tensor: ...

    def extra_repr(self) -> str: ...


def take_rows(lut: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``lut[idx]`` (rows of a lookup table, e.g. a byte's decoded values): numpy's take on the CPU (uint8/int32
    indices used as they are, no int64 index tensor), an embedding lookup for float tables elsewhere."""
    if idx.device.type == "cpu":
        return torch.from_numpy(np.take(lut.numpy(), idx.contiguous().numpy(), axis=0))
    if lut.is_floating_point():
        return torch.nn.functional.embedding(idx.to(torch.int32), lut)
    return lut[idx.long()]
