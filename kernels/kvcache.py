"""KV-cache quantization primitives and a real quantized transformers ``Cache``.

Tensors are ``[B, H_kv, T, D]`` (the layout of the attention's key/value states).  A
:class:`KVSpec` describes how one of K or V is stored:

- ``fp16``: rounded to fp16 (the baseline cache);
- ``int``: asymmetric uniform int-b, min-max per group; ``axis="token"`` groups ``group_size``
  channels of one token (kv-uniform, KIVI values), ``axis="channel"`` groups ``group_size``
  tokens of one channel (KIVI keys); scale and zero (= group min) stored in fp16;
- ``nuq``: KVQuant's non-uniform datatype: a vector is normalized to [-1, 1] by its range
  (``axis="channel"``: per channel, the lower/upper outlier thresholds calibrated offline;
  ``axis="token"``: per token over all KV heads, the inlier min/max computed online), rounded to
  the nearest of ``2**bits`` centroids; dense-and-sparse keeps outliers (keys: outside the
  channel's thresholds; values: the ``outlier_frac / 2`` largest and smallest entries of each
  token) in fp16 as a sparse part (int32 token-major flat index + fp16).

Tokens before ``sink`` (attention sink) and, for ``residual`` > 0, the most recent tokens that
do not fill a whole token group (KIVI's full-precision window) stay in fp16.  Codes are packed
along D: 2/4/8 bits into uint8 (value i in byte i // (8/b), bits (i % (8/b)) * b), 3 bits as
the int32 bit stream of :func:`quantbench.kernels.intq.pack_bits`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .intq import pack_bits, unpack_bits

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- specs


@dataclass
class KVSpec:
    """How one of K or V of one layer is quantized (tensors are per layer, from calibration)."""

    scheme: str = "fp16"  # fp16 | int | nuq
    axis: str = "token"  # token | channel
    bits: int = 16
    group_size: int = -1  # int: channels per group (token axis) / tokens per group (channel axis)
    outlier_frac: float = 0.0
    sink: int = 0
    residual: int = 0
    span_group: int = 0  # >0: the quantized span is a whole number of these token groups (KIVI values)
    centroids: torch.Tensor | None = None  # nuq: [2**bits] in [-1, 1]
    # nuq channel axis (keys): per-channel lower/upper outlier thresholds calibrated offline, fp16
    # [H, D]; they are also the normalization range (inliers normalize into [-1, 1])
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def static_bytes(self) -> int:
        """Bytes of the calibrated per-layer state a cache needs (fp16 thresholds, centroids)."""
        n = 0
        for t in (self.lo, self.hi, self.centroids):
            if t is not None:
                n += t.numel() * 2
        return n


def quantized_span(T: int, spec: KVSpec) -> tuple[int, int]:
    """[start, end) of the tokens stored quantized; the others stay fp16 (sink before, window after)."""
    start = min(spec.sink, T)
    if spec.scheme == "fp16":
        return start, start
    end = max(T - spec.residual, start)
    g = spec.group_size if (spec.scheme == "int" and spec.axis == "channel") else spec.span_group
    if g > 0:
        end = start + (end - start) // g * g
    return start, end


# --------------------------------------------------------------------------- packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., D] along D (uint8 for 2/4/8 bits, int32 bit stream for 3 bits)."""
    if bits == 3:
        return pack_bits(codes, 3, dim=-1)
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = (torch.arange(per, dtype=torch.uint8) * bits).to(codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8) if per > 1 else c[..., 0]


def unpack_codes(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes [..., D]."""
    if bits == 3:
        return unpack_bits(packed, 3, D, dim=-1).long()
    per = 8 // bits
    shifts = (torch.arange(per, dtype=torch.uint8) * bits).to(packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], D).long()


def byte_lut(table: torch.Tensor, bits: int) -> torch.Tensor:
    """[256, 8 // bits] float32: the ``table`` entries of the codes packed in each byte value."""
    per = 8 // bits
    b = torch.arange(256, dtype=torch.int64)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return table.float().cpu()[(b[:, None] >> shifts) & (2**bits - 1)].to(table.device)


def lookup_codes(
    packed: torch.Tensor, table: torch.Tensor, bits: int, D: int, lut: torch.Tensor | None = None
) -> torch.Tensor:
    """``table[code]`` as float32 [..., D] straight from the packed codes (no int64 code tensor).

    2/4/8 bits: one gather per byte from the [256, 8/b] :func:`byte_lut`; 3 bits: the int32 bit
    stream read as bytes (little endian, so byte order = bit-stream order), 3 bytes = 8 codes.
    """
    if bits == 3:
        by = packed.contiguous().view(torch.uint8).reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        w = by[..., 0] | (by[..., 1] << 8) | (by[..., 2] << 16)
        sh = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = (w.unsqueeze(-1) >> sh) & 7
        return table.float()[codes.reshape(*packed.shape[:-1], -1)[..., :D]]
    if lut is None:
        lut = byte_lut(table, bits)
    if packed.device.type == "cpu":  # numpy's take on uint8 indices: no index conversion, ~3x faster
        out = torch.from_numpy(np.take(lut.numpy(), packed.contiguous().numpy(), axis=0))
    else:
        out = torch.nn.functional.embedding(packed.to(torch.int32), lut)  # [..., D * b / 8, 8 / b]
    return out.reshape(*packed.shape[:-1], D)


# --------------------------------------------------------------------------- uniform int


def int_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero (the group minimum) of an asymmetric min-max grid, as float32."""
    zero = xmin.to(torch.float16).float()
    scale = ((xmax - zero) / (2**bits - 1)).clamp_min(1e-8).to(torch.float16).float()
    scale = torch.where(
        zero + scale * (2**bits - 1) < xmax,
        torch.nextafter(scale.half(), torch.tensor(float("inf"), dtype=torch.float16)).float(),
        scale,
    )
    return scale, zero


def _groups(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """View x [B, H, n, D] as [..., group] along the grouping axis."""
    B, H, n, D = x.shape
    if spec.axis == "token":
        g = D if spec.group_size in (-1, 0) else spec.group_size
        return x.reshape(B, H, n, D // g, g)
    g = spec.group_size
    return x.reshape(B, H, n // g, g, D).transpose(-1, -2)  # [B, H, n/g, D, g]


def _ungroup(xg: torch.Tensor, spec: KVSpec, shape: torch.Size) -> torch.Tensor:
    if spec.axis == "token":
        return xg.reshape(shape)
    return xg.transpose(-1, -2).reshape(shape)


# --------------------------------------------------------------------------- NUQ


def nearest_centroid(xn: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (centroids sorted ascending) via midpoints."""
    c = centroids.to(xn.dtype)
    mids = (c[1:] + c[:-1]) / 2
    return torch.bucketize(xn.contiguous(), mids)


def weighted_kmeans_1d(x: torch.Tensor, w: torch.Tensor | None, k: int, iters: int = 50) -> torch.Tensor:
    """Sorted 1-D k-means centroids minimising sum w (x - c)^2 (Lloyd, weighted-quantile init)."""
    x = x.flatten().double()
    w = torch.ones_like(x) if w is None else w.flatten().double().clamp_min(0) + 1e-30
    order = torch.argsort(x)
    xs, ws = x[order], w[order]
    cw = torch.cumsum(ws, 0) / ws.sum()
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = xs[torch.searchsorted(cw, q).clamp(max=xs.numel() - 1)]
    for _ in range(iters):
        idx = torch.bucketize(xs, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, ws * xs)
        den = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, ws)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        new, _ = torch.sort(new)
        if torch.allclose(new, c, atol=1e-9):
            c = new
            break
        c = new
    return c.float()


def q_norm(centroids: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """KVQuant's Q-Norm: shift/scale the centroids so the quantized data keeps xn's mean and std."""
    xq = centroids[nearest_centroid(xn.float(), centroids)]
    mu, sd = xn.float().mean(), xn.float().std()
    mq, sq = xq.mean(), xq.std().clamp_min(1e-12)
    return (centroids - mq) / sq * sd + mu


def topk_outlier_mask(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Mask of the ``round(frac * D)`` largest-|x| entries of each vector along the last dim."""
    n_out = int(round(frac * x.shape[-1]))
    mask = torch.zeros_like(x, dtype=torch.bool)
    if n_out > 0:
        mask.scatter_(-1, x.abs().topk(n_out, dim=-1).indices, True)
    return mask


# --------------------------------------------------------------------------- encode / decode


@dataclass
class Encoded:
    """n quantized tokens: the real buffers a cache stores.

    Per-token encodings (and per-channel ones whose range is calibrated offline or whose token
    groups are whole) are independent across tokens, so encodings concatenate along the token
    axis (:meth:`cat`): a cache keeps one contiguous store per layer.  Outlier indices are
    token-major (``((t * B + b) * H + h) * D + d``) so appending only offsets the new ones.
    """

    shape: tuple[int, int, int, int]
    codes: torch.Tensor
    scales: list[torch.Tensor] = field(default_factory=list)  # fp16 (scale, zero) or (lo, hi)
    out_idx: torch.Tensor | None = None  # int32 token-major flat indices
    out_val: torch.Tensor | None = None  # fp16

    def nbytes(self) -> dict[str, int]:
        def b(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {
            "codes": b(self.codes),
            "scales": sum(b(t) for t in self.scales),
            "outliers": b(self.out_idx) + b(self.out_val),
        }

    def cat(self, other: Encoded) -> Encoded:
        """This encoding followed by ``other`` along the token axis (one buffer per component)."""
        B, H, n, D = self.shape
        if other.shape[:2] != (B, H) or other.shape[3] != D:
            raise ValueError(f"Encoded.cat: shapes {self.shape} and {other.shape}")
        idx = val = None
        if self.out_idx is not None and other.out_idx is not None:
            if (n + other.shape[2]) * B * H * D >= 2**31:
                raise ValueError("Encoded.cat: outlier indices past int32")
            idx = torch.cat([self.out_idx, other.out_idx + n * B * H * D])
            assert self.out_val is not None and other.out_val is not None
            val = torch.cat([self.out_val, other.out_val])
        return Encoded(
            (B, H, n + other.shape[2], D),
            torch.cat([self.codes, other.codes], 2),
            [torch.cat([x, y], 2) for x, y in zip(self.scales, other.scales, strict=True)],
            idx,
            val,
        )


def key_outlier_mask(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Keys' sparse part: outside the per-channel [lo, hi] thresholds calibrated offline."""
    assert spec.lo is not None and spec.hi is not None
    return (x > spec.hi[None, :, None, :].float()) | (x < spec.lo[None, :, None, :].float())


def value_outlier_mask(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Values' sparse part, online per token (all heads): the ``round(frac * H * D / 2)`` largest
    and as many smallest entries (at least one each when ``frac`` > 0), i.e. the 1 - frac/2 and
    frac/2 quantile thresholds of the paper's per-vector dense-and-sparse scheme."""
    B, H, n, D = x.shape
    xt = x.transpose(1, 2).reshape(B, n, H * D)
    m = torch.zeros_like(xt, dtype=torch.bool)
    k = max(1, int(round(frac * H * D / 2))) if frac > 0 else 0
    if k:
        m.scatter_(-1, xt.topk(k, -1).indices, True)
        m.scatter_(-1, (-xt).topk(k, -1).indices, True)
    return m.reshape(B, n, H, D).transpose(1, 2)


def token_range(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (over all heads) inlier min and max as fp16 [B, 1, n, 1]."""
    lo = x.masked_fill(mask, torch.inf).amin((1, 3), keepdim=True)
    hi = x.masked_fill(mask, -torch.inf).amax((1, 3), keepdim=True)
    return lo.half(), hi.half()


def encode(x: torch.Tensor, spec: KVSpec) -> Encoded:
    """Quantize x [B, H, n, D] (all of it) with ``spec`` into packed buffers."""
    x = x.float()
    shape = cast(tuple[int, int, int, int], tuple(x.shape))  # x is [B, H, n, D]
    if spec.scheme == "int":
        xg = _groups(x, spec)
        scale, zero = int_params(xg.amin(-1), xg.amax(-1), spec.bits)
        codes = ((xg - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 2**spec.bits - 1)
        codes = _ungroup(codes, spec, x.shape)
        return Encoded(shape, pack_codes(codes, spec.bits), [scale.half(), zero.half()])
    if spec.scheme != "nuq":
        raise ValueError(f"encode: scheme {spec.scheme}")
    assert spec.centroids is not None
    if spec.axis == "channel":  # keys: per-channel thresholds = range, calibrated offline
        assert spec.lo is not None and spec.hi is not None
        mask = key_outlier_mask(x, spec)
        lo, hi = spec.lo[None, :, None, :].float(), spec.hi[None, :, None, :].float()
        scales: list[torch.Tensor] = []
    else:  # values: per-token online outliers and range
        mask = value_outlier_mask(x, spec.outlier_frac)
        lo16, hi16 = token_range(x, mask)
        scales = [lo16, hi16]
        lo, hi = lo16.float(), hi16.float()
    xn = (x - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-6)
    codes = nearest_centroid(xn, spec.centroids)
    mt = mask.permute(2, 0, 1, 3).reshape(-1)
    flat = mt.nonzero().flatten()
    return Encoded(
        shape,
        pack_codes(codes, spec.bits),
        scales,
        flat.to(torch.int32),
        x.permute(2, 0, 1, 3).reshape(-1)[flat].half(),
    )


def decode(e: Encoded, spec: KVSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an :class:`Encoded` to float32 [B, H, n, D]: a byte-LUT gather on the packed
    codes, the scale/offset broadcast, then the sparse outliers written in place.  ``out``: a
    float32 [B, H, n, D] view (e.g. a slice of the cache's output) to write into."""
    B, H, n, D = e.shape
    if spec.scheme == "int":
        codes = lookup_codes(e.codes, torch.arange(2**spec.bits, dtype=torch.float32), spec.bits, D)
        scale, zero = (t.float() for t in e.scales)
        xg = _groups(codes, spec).mul_(scale.unsqueeze(-1)).add_(zero.unsqueeze(-1))
        x = _ungroup(xg, spec, codes.shape)
        return x if out is None else out.copy_(x)
    assert spec.centroids is not None
    xn = lookup_codes(e.codes, spec.centroids, spec.bits, D)
    if spec.axis == "channel":
        assert spec.lo is not None and spec.hi is not None
        lo, hi = spec.lo[None, :, None, :].float(), spec.hi[None, :, None, :].float()
    else:
        lo, hi = (t.float() for t in e.scales)
    x = xn.mul_(((hi - lo) / 2).clamp_min(1e-6)).add_((hi + lo) / 2)
    if e.out_idx is not None and e.out_idx.numel():
        assert e.out_val is not None
        i = e.out_idx.long()  # token-major ((t * B + b) * H + h) * D + d -> [B, H, n, D] flat
        t, r = i.div(B * H * D, rounding_mode="floor"), i % (B * H * D)
        x.view(-1).index_put_(((r.div(D, rounding_mode="floor") * n + t) * D + r % D,), e.out_val.float())
    return x if out is None else out.copy_(x)


def qdq_sequence(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Evaluation path: quantize-dequantize a whole sequence x [B, H, T, D] (sink and window fp16)."""
    if spec.scheme == "fp16" or spec.bits >= 16:
        return x.half().to(x.dtype)
    s, e = quantized_span(x.shape[2], spec)
    parts = [x[:, :, :s].half().to(x.dtype)]
    if e > s:
        parts.append(decode(encode(x[:, :, s:e].half().float(), spec), spec).to(x.dtype))
    parts.append(x[:, :, e:].half().to(x.dtype))
    return torch.cat(parts, dim=2)


# --------------------------------------------------------------------------- real cache


class _KVStore:
    """One of K/V of one layer: fp16 sink tokens, one contiguous :class:`Encoded`, fp16 tail."""

    def __init__(self, spec: KVSpec) -> None:
        self.spec = spec
        self.enc: Encoded | None = None
        self.head: torch.Tensor | None = None  # fp16 sink tokens
        self.tail: torch.Tensor | None = None  # fp16 tokens not (yet) quantized

    @property
    def n_quant(self) -> int:
        return 0 if self.enc is None else self.enc.shape[2]

    def length(self) -> int:
        return sum(0 if t is None else t.shape[2] for t in (self.head, self.tail)) + self.n_quant

    def append(self, x: torch.Tensor) -> None:
        x = x.half()
        n_head = 0 if self.head is None else self.head.shape[2]
        need = max(self.spec.sink - n_head, 0) if self.spec.scheme != "fp16" else 0
        if need:
            h, x = x[:, :, :need], x[:, :, need:]
            self.head = h if self.head is None else torch.cat([self.head, h], 2)
        self.tail = x if self.tail is None else torch.cat([self.tail, x], 2)
        if self.spec.scheme == "fp16":
            return
        # tokens of the tail that the eval path's rule would quantize at this length
        T = self.length()
        _, end = quantized_span(T, self.spec)
        k = end - (T - self.tail.shape[2])
        if k > 0:
            new = encode(self.tail[:, :, :k].float(), self.spec)
            self.enc = new if self.enc is None else self.enc.cat(new)
            self.tail = self.tail[:, :, k:]

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """All tokens dequantized into one fresh buffer (transient: the store keeps only the packed
        codes, scales, outliers and fp16 sink/tail)."""
        if self.enc is None:
            parts = [t for t in (self.head, self.tail) if t is not None]
            return (parts[0] if len(parts) == 1 else torch.cat(parts, 2)).to(dtype)
        B, H, n, D = self.enc.shape
        s = 0 if self.head is None else self.head.shape[2]
        out = torch.empty(B, H, self.length(), D, dtype=torch.float32, device=self.enc.codes.device)
        if s:
            assert self.head is not None  # s > 0 only with a head
            out[:, :, :s] = self.head
        decode(self.enc, self.spec, out=out[:, :, s : s + n])
        if self.tail is not None and self.tail.shape[2]:
            out[:, :, s + n :] = self.tail
        return out.to(dtype)

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "scales": 0, "outliers": 0, "fp16": 0}
        if self.enc is not None:
            out.update(self.enc.nbytes())
        for t in (self.head, self.tail):
            if t is not None:
                out["fp16"] += t.numel() * t.element_size()
        out["static"] = self.spec.static_bytes()
        return out


class RopeTable:
    """cos/sin of the model's rotary embedding for positions 0..n-1, shared by every layer and
    grown geometrically, so a decode step slices it instead of recomputing all positions."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def get(self, T: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[2] < T or self.cos.dtype != like.dtype:
            n = max(T, 2 * (0 if self.cos is None else self.cos.shape[2]))
            pos = torch.arange(n, device=like.device).unsqueeze(0)
            cos, sin = self.rotary(like, pos)
            self.cos, self.sin = cos.unsqueeze(1).to(like.dtype), sin.unsqueeze(1).to(like.dtype)
        assert self.sin is not None
        return self.cos[:, :, :T], self.sin[:, :, :T]


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``k * cos + rotate_half(k) * sin`` (transformers' formula) without the concatenation."""
    h = k.shape[-1] // 2
    out = k * cos
    out[..., :h] -= k[..., h:] * sin[..., :h]
    out[..., h:] += k[..., :h] * sin[..., h:]
    return out


class QuantizedKVCache:
    """Factory of a transformers ``DynamicCache`` whose layers store quantized K/V.

    Keys are stored pre-RoPE (KVQuant): the model's k_proj wrappers hand their output to the
    cache (``capture``), the layer quantizes it, and returns dequantized keys with RoPE applied
    for positions 0..T-1 (``rotary`` = the model's rotary embedding; None for models without RoPE).
    """

    def __new__(
        cls, specs: list[tuple[KVSpec, KVSpec]], rotary: nn.Module | None = None, captures: list[Any] | None = None
    ) -> Any:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        class QuantizedKVLayer(DynamicLayer):
            def __init__(self, k_spec: KVSpec, v_spec: KVSpec, capture: Any) -> None:
                super().__init__()
                self.k_store, self.v_store = _KVStore(k_spec), _KVStore(v_spec)
                self.capture = capture
                self.keys = self.values = None

            def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
                self.device, self.dtype = key_states.device, key_states.dtype
                self.is_initialized = True

            def update(
                self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                pre = key_states
                if self.capture is not None and getattr(self.capture, "captured", None) is not None:
                    pre = self.capture.captured  # pre-RoPE keys [B, H, n, D]
                    self.capture.captured = None
                self.k_store.append(pre)
                self.v_store.append(value_states)
                keys = self.k_store.materialize(self.dtype)
                if rope is not None and self.capture is not None:
                    keys = apply_rope(keys, *rope.get(keys.shape[2], keys))
                return keys, self.v_store.materialize(self.dtype)

            def get_seq_length(self) -> int:
                return self.k_store.length()

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return self.get_seq_length() + query_length, 0

        caps = captures or [None] * len(specs)
        rope = None if rotary is None else RopeTable(rotary)
        # list[Any]: Cache.__init__'s (invariant) list element type differs across transformers versions
        layers: list[Any] = [QuantizedKVLayer(k, v, c) for (k, v), c in zip(specs, caps, strict=True)]
        cache: Any = DynamicCache.__new__(DynamicCache)  # a DynamicCache given a kv_bytes() attribute below
        from transformers.cache_utils import Cache

        Cache.__init__(cache, layers=layers)
        cache.kv_bytes = lambda: kv_bytes(cache)
        return cache


def kv_bytes(cache: Any) -> dict[str, int]:
    """Bytes held by a :class:`QuantizedKVCache`, by component, from its real buffers."""
    tot = {"codes": 0, "scales": 0, "outliers": 0, "fp16": 0, "static": 0}
    for layer in cache.layers:
        for st in (layer.k_store, layer.v_store):
            for k, v in st.nbytes().items():
                tot[k] += v
    tot["total"] = sum(tot.values())
    return tot


# --------------------------------------------------------------------------- decode attention reference


def dequant_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Reference dequantization of the per-token packed layout to float32 [B, H, T, D]."""
    c = unpack_codes(codes, bits, D).float()
    G = D // scale.shape[-1]
    s = scale.float().repeat_interleave(G, -1)
    z = zero.float().repeat_interleave(G, -1)
    return c * s + z


def decode_attention_ref(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Torch reference: q [B, H_q, D] against the packed cache; returns [B, H_q, D] float32."""
    B, Hq, D = q.shape
    k = dequant_per_token(k_codes, k_scale, k_zero, bits, D)
    v = dequant_per_token(v_codes, v_scale, v_zero, bits, D)
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) / math.sqrt(D)
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v)


__all__ = [
    "KVSpec",
    "Encoded",
    "encode",
    "decode",
    "qdq_sequence",
    "pack_codes",
    "unpack_codes",
    "weighted_kmeans_1d",
    "q_norm",
    "topk_outlier_mask",
    "QuantizedKVCache",
    "kv_bytes",
    "quantized_span",
    "decode_attention_ref",
    "dequant_per_token",
    "lookup_codes",
    "byte_lut",
    "key_outlier_mask",
    "value_outlier_mask",
    "token_range",
    "apply_rope",
    "RopeTable",
]
