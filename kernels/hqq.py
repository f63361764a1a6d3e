"""HQQ's packed format: integer codes with a float scale and a float zero point per group, both fp16.

Half-Quadratic Quantization (Badri & Shaji, 2023) dequantizes ``w = scale * (q - zero)`` where, unlike
the GPTQ grid of :mod:`~quantbench.kernels.intq`, the optimized ``zero`` is a float.  Buffers:

- ``qweight`` int32 [in * bits / 32, out]: codes packed along the input dimension, the bit stream of
  :func:`~quantbench.kernels.intq.pack_bits` (the GPTQ ``qweight`` layout, 3 bits included);
- ``scales``  fp16 [n_groups, out];
- ``zeros``   fp16 [n_groups, out]: float zero points, in code units;

group ``g`` covers input columns ``[g * group_size, (g + 1) * group_size)`` (the last one may be shorter).
Bits per weight: ``bits + 32 / group_size``.

- :func:`hqq_dequantize` is the reference (unpack, dequantize in fp32).
- :func:`convert_hqq_int4pack` / :func:`hqq_int4pack_mm` are the CPU fast path through torch's
  ``_weight_int4pack_mm_for_cpu``, which dequantizes ``(q - 8) * s + z`` with a bf16 ``(s, z)`` pair
  per (op group, output): a float zero fits as is, ``z = s * (8 - off - zero)``, where 2- and 3-bit
  codes are first centred in the op's 4-bit slots (``off = 8 - 2^(bits-1)``, as
  :mod:`~quantbench.kernels.intmm` does).  The op's group size ``G`` (32..256) is any divisor of both
  the group size and ``in_features``; the computation is bf16 (about 50 dB against the reference).
"""

from __future__ import annotations

import torch

from .intmm import INT4PACK_BITS, INT4PACK_GROUPS, Int4Pack
from .intq import unpack_rows


def hqq_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int, group_size: int
) -> torch.Tensor:
    """The dense fp32 weight [out, in] of the packed buffers (the reference)."""
    g = torch.arange(in_features, device=qweight.device) // group_size
    q = unpack_rows(qweight, bits, in_features).float()  # [in, out]
    w = scales.float()[g] * (q - zeros.float()[g])
    return w.t().contiguous()


def hqq_int4pack_group(in_features: int, out_features: int, bits: int, group_size: int) -> int | None:
    """The op group size for this shape, or None when the CPU op cannot run it."""
    if bits not in INT4PACK_BITS or out_features % 16:
        return None
    for g in INT4PACK_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


def convert_hqq_int4pack(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int, group_size: int
) -> Int4Pack:
    """The packed buffers converted into the CPU op's tiled weight and bf16 ``(s, z)`` pairs."""
    out_features = qweight.shape[1]
    G = hqq_int4pack_group(in_features, out_features, bits, group_size)
    if G is None:
        raise ValueError(f"hqq: {in_features}x{out_features} at {bits} bits, group {group_size} does not fit int4pack")
    off = 8 - 2 ** (bits - 1)
    codes = unpack_rows(qweight, bits, in_features) + off  # [in, out]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 2)
    ours = torch.arange(0, in_features, G, device=scales.device) // group_size  # our group of each op group
    s = scales.float()[ours]  # [in / G, out]
    z = s * (8 - off - zeros.float()[ours])
    sz = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Pack(packed, sz, G, None)


def hqq_int4pack_mm(x: torch.Tensor, pack: Int4Pack, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` through ``_weight_int4pack_mm_for_cpu`` (bf16 activations); output in ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, pack.packed, pack.group, pack.scales_and_zeros).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)
