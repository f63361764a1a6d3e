"""Matmul over int-packed weights (GPTQ layout): dispatch between the reference and fast paths.

- ``reference_linear`` is the ground truth: unpack codes, dequantize with the fp16 group
  scales and integer zeros, and run a dense matmul.
- ``int4pack_linear`` is the CPU fast path for 4-bit weights, and for 2- and 3-bit weights
  whose codes (< 8) fit the same 4-bit slots: torch's ``_weight_int4pack_mm_for_cpu`` with bf16
  activations.  For 2/3 bits the converted runtime copy takes 4 bits per weight in memory (as
  llama.cpp repacks for its CPU kernels); the stored checkpoint, and ``bits_per_weight``, stay at
  2/3 bits — the reference path unpacks the 3-bit stream on every call, ~4x slower than fp32.  That op dequantizes
  ``w = (q - 8) * s + z``; our grid is ``w = s * (q - zero)`` with an integer ``zero``, so
  ``z = s * (8 - zero)``.  The op's group size ``G`` (32..256) is any divisor of both our group
  size and ``in_features`` (each of our groups is split into ``group_size / G`` op groups with
  the same scale), so e.g. group 128 on 576-wide rows runs with ``G = 64``.  Act-order
  checkpoints whose ``g_idx`` sorts into contiguous groups run with the input columns permuted
  once per call.  The converted weight is built lazily and cached on the module.
- ``int8pack_linear`` is the CPU fast path for 8-bit weights with one group per row (per-channel
  scales and zeros, e.g. ``rtn-w8``): torch's ``_weight_int8pack_mm`` (symmetric int8 weights,
  one scale per output channel, bf16 activations).  Our asymmetric grid
  ``w = s (q - zero)`` with ``q`` in [0, 255] is split as ``s (q - 128) + s (128 - zero)``: the op
  runs on the int8 codes ``q - 128`` and the per-channel constant ``s (128 - zero)`` multiplies
  the activations' row sums.  The runtime copy is one byte per weight (as stored).  Grouped
  8-bit weights have no such op and take the reference path.
- On CUDA, :mod:`quantbench.kernels.triton_w4a16` runs the Triton kernel.

The fast path computes in bf16 (activations and scales rounded to bf16; accumulation in fp32):
its output differs from the reference by about 2^-9 relative (SQNR ~ 50 dB, pinned in tests).
Set ``CPU_FAST_PATH = False`` to force the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .intq import IntPackedWeight

#: use torch's packed int4 op on CPU where shapes allow
CPU_FAST_PATH = True
#: group sizes torch's CPU int4 op accepts, largest first
INT4PACK_GROUPS = (256, 128, 64, 32)
#: code widths whose codes fit the op's 4-bit slots (the dequantization formula is width independent)
INT4PACK_BITS = (2, 3, 4)


def reference_linear(x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    w = layer.dequantized_weight().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


@dataclass
class Int4Pack:
    """The module's weight converted for ``_weight_int4pack_mm_for_cpu`` (cached on the module)."""

    packed: torch.Tensor  # uint8, the op's tiled layout of codes [out, in]
    scales_and_zeros: torch.Tensor  # bf16 [in / G, out, 2]
    group: int  # the op's group size G
    perm: torch.Tensor | None  # input-column permutation (act-order), or None


def _op_group(layer: IntPackedWeight) -> int | None:
    for g in INT4PACK_GROUPS:
        if layer.group_size % g == 0 and layer.in_features % g == 0:
            return g
    return None


def _versions(layer: IntPackedWeight) -> tuple[int, int, int, int]:
    return (layer.qweight._version, layer.qzeros._version, layer.scales._version, layer.g_idx._version)


def int4pack_supported(layer: IntPackedWeight) -> bool:
    """2-4 bits, ``out_features % 16 == 0``, an op group size that divides ours, contiguous groups."""
    if layer.bits not in INT4PACK_BITS or layer.out_features % 16 or _op_group(layer) is None:
        return False
    return _group_perm(layer) is not False


def _group_perm(layer: IntPackedWeight) -> torch.Tensor | None | Literal[False]:
    """None when g_idx is natural; a permutation making groups contiguous; False when there is none."""
    g_idx = layer.g_idx.long()
    natural = torch.arange(layer.in_features, device=g_idx.device) // layer.group_size
    if torch.equal(g_idx, natural):
        return None
    perm = torch.argsort(g_idx, stable=True)
    return perm if torch.equal(g_idx[perm], natural) else False


def convert_int4pack(layer: IntPackedWeight) -> Int4Pack:
    """Convert the GPTQ buffers into the CPU op's packed weight and (s, z) pairs."""
    G = _op_group(layer)
    perm = _group_perm(layer)
    if G is None or perm is False:
        raise ValueError(f"layer {layer.extra_repr()} is not supported by the int4pack CPU op")
    # 2/3-bit codes are centred in the 4-bit range (q + 8 - 2^(bits-1)) so that z = s (2^(bits-1) - zero)
    # stays small: with bf16 z, an uncentred 2-bit grid loses ~10 dB to cancellation
    off = 8 - 2 ** (layer.bits - 1)
    codes = layer.codes() + off  # [in, out]
    # group of each (permuted) column
    g_sorted = torch.arange(layer.in_features, device=codes.device) // layer.group_size
    if perm is not None:
        codes = codes[perm]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 2)
    # op group j covers (permuted) columns [j G, (j + 1) G): one of our groups
    ours = g_sorted[torch.arange(0, layer.in_features, G, device=codes.device)]
    s = layer.scales.float()[ours]  # [in / G, out]
    z = s * (8 - off - layer.zeros().float()[ours])
    sz = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Pack(packed, sz, G, perm)


def _cached(layer: IntPackedWeight, attr: str, supported: Callable, convert: Callable) -> Any:
    """``convert(layer)`` cached on the module as ``attr`` until a buffer changes (None when unsupported)."""
    cached = getattr(layer, attr, None)
    if cached is not None and torch.compiler.is_compiling():
        return cached[1]  # a compiled step (methods.timing): built by the eager prefill; versions don't trace
    versions = _versions(layer)
    if cached is None or cached[0] != versions:
        cached = (versions, convert(layer) if supported(layer) else None)
        setattr(layer, attr, cached)
    return cached[1]


def int4pack_cache(layer: IntPackedWeight) -> Int4Pack | None:
    """The module's converted weight, built on first use (None, also cached, when unsupported)."""
    return _cached(layer, "_int4pack", int4pack_supported, convert_int4pack)


def int4pack_linear(x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    """CPU fast path: bf16 activations through ``_weight_int4pack_mm_for_cpu``; output in ``x.dtype``."""
    cache = int4pack_cache(layer)
    if cache is None:
        raise ValueError(f"layer {layer.extra_repr()} is not supported by the int4pack CPU op")
    x2 = x.reshape(-1, x.shape[-1])
    if cache.perm is not None:
        x2 = x2.index_select(1, cache.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2.to(torch.bfloat16).contiguous(), cache.packed, cache.group, cache.scales_and_zeros
    )
    return _epilogue(y, x, layer)


def _epilogue(y: torch.Tensor, x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    """The fast paths' output [M, out] back in ``x``'s dtype and leading shape, plus the bias."""
    y = y.to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


@dataclass
class Int8Pack:
    """The module's 8-bit weight converted for ``_weight_int8pack_mm`` (cached on the module)."""

    codes: torch.Tensor  # int8 [out, in]: q - 128
    scales: torch.Tensor  # bf16 [out]
    offset: torch.Tensor  # fp32 [out]: s (128 - zero), times the activations' row sum


def int8pack_supported(layer: IntPackedWeight) -> bool:
    """8 bits and one group per row (per-channel scale and zero)."""
    return layer.bits == 8 and layer.group_size >= layer.in_features


def convert_int8pack(layer: IntPackedWeight) -> Int8Pack:
    if not int8pack_supported(layer):
        raise ValueError(f"layer {layer.extra_repr()} is not supported by the int8pack CPU op")
    codes = (layer.codes() - 128).to(torch.int8).t().contiguous()  # [out, in]
    s = layer.scales.float()[0]
    off = s * (128 - layer.zeros().float()[0])
    return Int8Pack(codes, s.to(torch.bfloat16), off)


def int8pack_cache(layer: IntPackedWeight) -> Int8Pack | None:
    """The module's converted 8-bit weight, built on first use (None, also cached, when unsupported)."""
    return _cached(layer, "_int8pack", int8pack_supported, convert_int8pack)


def int8pack_linear(x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    """CPU fast path for per-channel 8-bit weights: ``_weight_int8pack_mm`` plus the zero-point term."""
    cache = int8pack_cache(layer)
    if cache is None:
        raise ValueError(f"layer {layer.extra_repr()} is not supported by the int8pack CPU op")
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch._weight_int8pack_mm(xb, cache.codes, cache.scales).float()
    y = y + xb.float().sum(-1, keepdim=True) * cache.offset
    return _epilogue(y, x, layer)


def int_weight_linear(x: torch.Tensor, layer: IntPackedWeight) -> torch.Tensor:
    """Packed-path forward for a packed integer weight (:class:`~quantbench.kernels.intq.IntPackedWeight`)."""
    if x.is_cuda and layer.bits in (2, 4, 8):
        from .triton_w4a16 import triton_int_linear  # deferred: triton is optional

        return triton_int_linear(x, layer)
    if (CPU_FAST_PATH and x.device.type == "cpu" and layer.bits in INT4PACK_BITS
            and int4pack_cache(layer) is not None):
        return int4pack_linear(x, layer)
    if CPU_FAST_PATH and x.device.type == "cpu" and layer.bits == 8 and int8pack_cache(layer) is not None:
        return int8pack_linear(x, layer)
    return reference_linear(x, layer)
