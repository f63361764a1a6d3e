"""KV-cache quantization primitives and a real quantized transformers ``Cache``.

Tensors are ``[B, H_kv, T, D]`` (the layout of the attention's key/value states).  A
:class:`KVSpec` describes how one of K or V is stored:

- ``fp16``: rounded to fp16 (the baseline cache);
- ``int``: asymmetric uniform int-b, min-max per group; ``axis="token"`` groups ``group_size``
  channels of one token (kv-uniform, KIVI values), ``axis="channel"`` groups ``group_size``
  tokens of one channel (KIVI keys); scale and zero (= group min) stored in fp16;
- ``nuq``: KVQuant's non-uniform datatype: a vector is normalized to [-1, 1] by its range
  (``axis="channel"``: per channel, range calibrated offline; ``axis="token"``: per token,
  computed online), rounded to the nearest of ``2**bits`` centroids; dense-and-sparse keeps
  outliers (magnitude above a per-channel calibrated threshold for keys, the top
  ``outlier_frac`` of each token for values) in fp16 as a sparse part (int32 flat index + fp16).

Tokens before ``sink`` (attention sink) and, for ``residual`` > 0, the most recent tokens that
do not fill a whole token group (KIVI's full-precision window) stay in fp16.  Codes are packed
along D: 2/4/8 bits into uint8 (value i in byte i // (8/b), bits (i % (8/b)) * b), 3 bits as
the int32 bit stream of :func:`quantbench.kernels.intq.pack_bits`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.kernels.intq import pack_bits, unpack_bits

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
    lo: torch.Tensor | None = None  # nuq channel axis: calibrated inlier range [H, D]
    hi: torch.Tensor | None = None
    thresh: torch.Tensor | None = None  # nuq channel axis: outlier magnitude threshold [H, D]

    def static_bytes(self) -> int:
        """Bytes of the calibrated per-layer state a cache needs (fp16 ranges/thresholds, centroids)."""
        n = 0
        for t in (self.lo, self.hi, self.thresh, self.centroids):
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


# --------------------------------------------------------------------------- uniform int


def int_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero (the group minimum) of an asymmetric min-max grid, as float32."""
    zero = xmin.to(torch.float16).float()
    scale = ((xmax - zero) / (2**bits - 1)).clamp_min(1e-8).to(torch.float16).float()
    scale = torch.where(zero + scale * (2**bits - 1) < xmax, torch.nextafter(
        scale.half(), torch.tensor(float("inf"), dtype=torch.float16)).float(), scale)
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


def weighted_kmeans_1d(
    x: torch.Tensor, w: torch.Tensor | None, k: int, iters: int = 50
) -> torch.Tensor:
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
    """One quantized chunk of n tokens: the real buffers a cache stores."""

    shape: tuple[int, int, int, int]
    codes: torch.Tensor
    scales: list[torch.Tensor] = field(default_factory=list)  # fp16 (scale, zero) or (lo, hi)
    out_idx: torch.Tensor | None = None  # int32 flat indices into shape
    out_val: torch.Tensor | None = None  # fp16

    def nbytes(self) -> dict[str, int]:
        def b(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        return {
            "codes": b(self.codes),
            "scales": sum(b(t) for t in self.scales),
            "outliers": b(self.out_idx) + b(self.out_val),
        }


def encode(x: torch.Tensor, spec: KVSpec) -> Encoded:
    """Quantize x [B, H, n, D] (all of it) with ``spec`` into packed buffers."""
    x = x.float()
    shape = tuple(x.shape)
    if spec.scheme == "int":
        xg = _groups(x, spec)
        scale, zero = int_params(xg.amin(-1), xg.amax(-1), spec.bits)
        codes = ((xg - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 2**spec.bits - 1)
        codes = _ungroup(codes, spec, x.shape)
        return Encoded(shape, pack_codes(codes, spec.bits), [scale.half(), zero.half()])
    if spec.scheme != "nuq":
        raise ValueError(f"encode: scheme {spec.scheme}")
    assert spec.centroids is not None
    if spec.axis == "channel":  # keys: calibrated per-channel threshold and range
        assert spec.thresh is not None and spec.lo is not None and spec.hi is not None
        mask = x.abs() > spec.thresh[None, :, None, :]
        lo, hi = spec.lo[None, :, None, :].float(), spec.hi[None, :, None, :].float()
        scales: list[torch.Tensor] = []
    else:  # values: per-token online outliers and range
        mask = topk_outlier_mask(x, spec.outlier_frac)
        inl_hi = torch.where(mask, torch.full_like(x, -torch.inf), x).amax(-1, keepdim=True)
        inl_lo = torch.where(mask, torch.full_like(x, torch.inf), x).amin(-1, keepdim=True)
        lo, hi = inl_lo.half(), inl_hi.half()
        scales = [lo, hi]
        lo, hi = lo.float(), hi.float()
    xn = (x - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-6)
    codes = nearest_centroid(xn, spec.centroids)
    flat = mask.flatten().nonzero().flatten()
    return Encoded(shape, pack_codes(codes, spec.bits), scales,
                   flat.to(torch.int32), x.flatten()[flat].half())


def decode(e: Encoded, spec: KVSpec) -> torch.Tensor:
    """Dequantize an :class:`Encoded` chunk to float32 [B, H, n, D]."""
    B, H, n, D = e.shape
    codes = unpack_codes(e.codes, spec.bits, D).float()
    if spec.scheme == "int":
        scale, zero = (t.float() for t in e.scales)
        xg = _groups(codes, spec) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return _ungroup(xg, spec, codes.shape)
    assert spec.centroids is not None
    xn = spec.centroids.float()[codes.long()]
    if spec.axis == "channel":
        assert spec.lo is not None and spec.hi is not None
        lo, hi = spec.lo[None, :, None, :].float(), spec.hi[None, :, None, :].float()
    else:
        lo, hi = (t.float() for t in e.scales)
    x = xn * ((hi - lo) / 2).clamp_min(1e-6) + (hi + lo) / 2
    if e.out_idx is not None and e.out_idx.numel():
        x = x.flatten().index_put((e.out_idx.long(),), e.out_val.float()).reshape(B, H, n, D)
    return x


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _KVStore:
    """Quantized chunks + fp16 tokens of one of K/V of one layer, in token order."""

    def __init__(self, spec: KVSpec) -> None:
        self.spec = spec
        self.chunks: list[Encoded] = []
        self.head: torch.Tensor | None = None  # fp16 sink tokens
        self.tail: torch.Tensor | None = None  # fp16 tokens not (yet) quantized
        self.n_quant = 0

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
            self.chunks.append(encode(self.tail[:, :, :k].float(), self.spec))
            self.n_quant += k
            self.tail = self.tail[:, :, k:]

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        parts = [] if self.head is None else [self.head.to(dtype)]
        parts += [decode(c, self.spec).to(dtype) for c in self.chunks]
        if self.tail is not None:
            parts.append(self.tail.to(dtype))
        return torch.cat(parts, dim=2)

    def nbytes(self) -> dict[str, int]:
        out = {"codes": 0, "scales": 0, "outliers": 0, "fp16": 0}
        for c in self.chunks:
            for k, v in c.nbytes().items():
                out[k] += v
        for t in (self.head, self.tail):
            if t is not None:
                out["fp16"] += t.numel() * t.element_size()
        out["static"] = self.spec.static_bytes()
        return out


class QuantizedKVCache:
    """Factory of a transformers ``DynamicCache`` whose layers store quantized K/V.

    Keys are stored pre-RoPE (KVQuant): the model's k_proj wrappers hand their output to the
    cache (``capture``), the layer quantizes it, and returns dequantized keys with RoPE applied
    for positions 0..T-1 (``rotary`` = the model's rotary embedding; None for models without RoPE).
    """

    def __new__(cls, specs: list[tuple[KVSpec, KVSpec]], rotary: nn.Module | None = None,
                captures: list[Any] | None = None) -> Any:
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

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                pre = key_states
                if self.capture is not None and getattr(self.capture, "captured", None) is not None:
                    pre = self.capture.captured  # pre-RoPE keys [B, H, n, D]
                    self.capture.captured = None
                self.k_store.append(pre)
                self.v_store.append(value_states)
                keys = self.k_store.materialize(self.dtype)
                if rotary is not None and self.capture is not None:
                    T = keys.shape[2]
                    pos = torch.arange(T, device=keys.device).unsqueeze(0)
                    cos, sin = rotary(keys, pos)
                    cos, sin = cos.unsqueeze(1).to(keys.dtype), sin.unsqueeze(1).to(keys.dtype)
                    keys = keys * cos + _rotate_half(keys) * sin
                return keys, self.v_store.materialize(self.dtype)

            def get_seq_length(self) -> int:
                return self.k_store.length()

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return self.get_seq_length() + query_length, 0

        caps = captures or [None] * len(specs)
        layers = [QuantizedKVLayer(k, v, c) for (k, v), c in zip(specs, caps, strict=True)]
        cache = DynamicCache.__new__(DynamicCache)
        from transformers.cache_utils import Cache

        Cache.__init__(cache, layers=layers)
        cache.kv_bytes = lambda: kv_bytes(cache)  # type: ignore[attr-defined]
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


def dequant_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      D: int) -> torch.Tensor:
    """Reference dequantization of the per-token packed layout to float32 [B, H, T, D]."""
    c = unpack_codes(codes, bits, D).float()
    G = D // scale.shape[-1]
    s = scale.float().repeat_interleave(G, -1)
    z = zero.float().repeat_interleave(G, -1)
    return c * s + z


def decode_attention_ref(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
                         k_zero: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                         v_zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Torch reference: q [B, H_q, D] against the packed cache; returns [B, H_q, D] float32."""
    B, Hq, D = q.shape
    k = dequant_per_token(k_codes, k_scale, k_zero, bits, D)
    v = dequant_per_token(v_codes, v_scale, v_zero, bits, D)
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) / math.sqrt(D)
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v)


__all__ = ["KVSpec", "Encoded", "encode", "decode", "qdq_sequence", "pack_codes", "unpack_codes",
           "weighted_kmeans_1d", "q_norm", "topk_outlier_mask", "QuantizedKVCache", "kv_bytes",
           "quantized_span", "decode_attention_ref", "dequant_per_token"]
