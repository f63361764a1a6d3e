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

Tokens before ``sink`` (attention sink), the last ``residual`` tokens and the newest tokens that do
not fill a whole ``span_group`` block (KIVI's full-precision windows, :func:`quantized_span`)
stay in fp16.  Codes are packed
along D: 2/4/8 bits into uint8 (value i in byte i // (8/b), bits (i % (8/b)) * b), 3 bits as
the int32 bit stream of :func:`quantbench.kernels.intq.pack_bits`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .cpp import load_cpp_ops, loaded_cpp_ops
from .intq import pack_bits, take_rows, unpack_bits

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
    span_group: int = 0  # >0: the quantized span is a whole number of these token blocks (KIVI keys: R)
    centroids: torch.Tensor | None = None  # nuq: [2**bits] in [-1, 1], the table codes are assigned against
    # nuq channel axis (keys): per-channel lower/upper outlier thresholds calibrated offline, fp16
    # [H, D]; they are also the normalization range (inliers normalize into [-1, 1])
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    # nuq Q-Norm (KVQuant): (scale, offset) applied to the looked-up centroid, calibrated offline so the
    # reconstruction keeps the normalized calibration data's mean and std; codes use ``centroids`` as is
    qnorm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.scheme == "int" and self.axis == "channel" and self.span_group % max(self.group_size, 1):
            raise ValueError(f"KVSpec: span_group {self.span_group} is not a multiple of group_size {self.group_size}")

    def table(self) -> torch.Tensor:
        """nuq: the reconstruction table, ``centroids`` with the Q-Norm scale/offset applied (if any)."""
        assert self.centroids is not None
        if self.qnorm is None:
            return self.centroids
        return self.centroids.float() * self.qnorm[0] + self.qnorm[1]

    def static_bytes(self) -> int:
        """Bytes of the calibrated per-layer state a cache needs (fp16 thresholds, centroids, and the
        Q-Norm scale and offset as two float32)."""
        n = 0
        for t in (self.lo, self.hi, self.centroids):
            if t is not None:
                n += t.numel() * 2
        return n + (8 if self.qnorm is not None else 0)


def quantized_span(T: int, spec: KVSpec) -> tuple[int, int]:
    """[start, end) of the tokens stored quantized; the others stay fp16 (sink before, window after).

    The last ``residual`` tokens stay fp16; of the rest, the quantized span is the longest run of
    whole ``span_group`` blocks (per-channel int keys without one: whole ``group_size`` groups).
    KIVI: keys have ``span_group`` = R and no residual (every full block of R tokens quantized, the
    T mod R newest in fp16), values ``residual`` = R (the R newest in fp16, the others per token).
    """
    start = min(spec.sink, T)
    if spec.scheme == "fp16":
        return start, start
    end = max(T - spec.residual, start)
    g = spec.span_group or (spec.group_size if (spec.scheme == "int" and spec.axis == "channel") else 0)
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
    shifts = torch.arange(per, dtype=torch.uint8, device=codes.device) * bits
    return (c << shifts).sum(-1, dtype=torch.uint8) if per > 1 else c[..., 0]


def unpack_codes(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes [..., D]."""
    if bits == 3:
        return unpack_bits(packed, 3, D, dim=-1).long()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    c = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], D).long()


def byte_lut(table: torch.Tensor, bits: int) -> torch.Tensor:
    """[256, 8 // bits] float32: the ``table`` entries of the codes packed in each byte value."""
    per = 8 // bits
    b = torch.arange(256, dtype=torch.int64, device="cpu")  # built on the CPU, then moved to the table's device
    shifts = torch.arange(per, dtype=torch.int64, device="cpu") * bits
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
        return table.float().to(packed.device)[codes.reshape(*packed.shape[:-1], -1)[..., :D]]
    if lut is None:
        lut = byte_lut(table, bits).to(packed.device)
    return take_rows(lut, packed).reshape(*packed.shape[:-1], D)  # [..., D * b / 8, 8 / b] -> [..., D]


# --------------------------------------------------------------------------- uniform int


def int_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero (the group minimum) of an asymmetric min-max grid, as float32."""
    zero = xmin.to(torch.float16).float()
    scale = ((xmax - zero) / (2**bits - 1)).clamp_min(1e-8).to(torch.float16).float()
    scale = torch.where(
        zero + scale * (2**bits - 1) < xmax,
        torch.nextafter(scale.half(), torch.tensor(float("inf"), dtype=torch.float16, device=scale.device)).float(),
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
    q = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k
    c = xs[torch.searchsorted(cw, q).clamp(max=xs.numel() - 1)]
    for _ in range(iters):
        idx = torch.bucketize(xs, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, idx, ws * xs)
        den = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, idx, ws)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        new, _ = torch.sort(new)
        if torch.allclose(new, c, atol=1e-9):
            c = new
            break
        c = new
    return c.float()


def q_norm(centroids: torch.Tensor, xn: torch.Tensor) -> tuple[float, float]:
    """KVQuant's Q-Norm: (scale, offset) for the reconstruction ``centroids[code] * scale + offset``.

    Codes stay nearest-centroid against the original ``centroids``; the affine map is fitted so the
    reconstruction of the (normalized calibration) data ``xn`` has xn's mean and std.
    """
    x = xn.double()
    xq = centroids.double()[nearest_centroid(x, centroids.double())]
    mu, sd = x.mean(), x.std()
    mq, sq = xq.mean(), xq.std().clamp_min(1e-12)
    scale = sd / sq
    return float(scale), float(mu - mq * scale)


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

    def cat(self, other: Encoded, join: Callable[[str, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
            ) -> Encoded:
        """This encoding followed by ``other`` along the token axis (one buffer per component).  ``join(name, a,
        b, dim)`` concatenates one component (default ``torch.cat``; a store passes its in-place growth)."""
        B, H, n, D = self.shape
        if other.shape[:2] != (B, H) or other.shape[3] != D:
            raise ValueError(f"Encoded.cat: shapes {self.shape} and {other.shape}")
        cat = join or (lambda _name, a, b, dim: torch.cat([a, b], dim))
        idx = val = None
        if self.out_idx is not None and other.out_idx is not None:
            if (n + other.shape[2]) * B * H * D >= 2**31:
                raise ValueError("Encoded.cat: outlier indices past int32")
            idx = cat("out_idx", self.out_idx, other.out_idx + n * B * H * D, 0)
            assert self.out_val is not None and other.out_val is not None
            val = cat("out_val", self.out_val, other.out_val, 0)
        return Encoded(
            (B, H, n + other.shape[2], D),
            cat("codes", self.codes, other.codes, 2),
            [cat(f"scale{i}", x, y, 2) for i, (x, y) in enumerate(zip(self.scales, other.scales, strict=True))],
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


_SPEC_CONSTS: dict[tuple[int, ...], tuple[tuple[Any, ...], dict[str, torch.Tensor]]] = {}


def _nuq_consts(spec: KVSpec, dev: torch.device) -> dict[str, torch.Tensor]:
    """encode()'s per-spec float32 constants (centroid midpoints; keys: the channel thresholds, midpoint and
    half range), computed once per spec (a decode step encodes one token, where these small ops dominate)."""
    objs = (spec, spec.centroids, spec.lo, spec.hi)  # held by the cache, so their ids are not reused
    key = (*map(id, objs), hash(dev))
    hit = _SPEC_CONSTS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], objs, strict=True)):
        return hit[1]
    assert spec.centroids is not None
    c = spec.centroids.to(torch.float32)
    out = {"mids": ((c[1:] + c[:-1]) / 2).to(dev)}
    if spec.axis == "channel":
        assert spec.lo is not None and spec.hi is not None
        lo, hi = spec.lo[None, :, None, :].float().to(dev), spec.hi[None, :, None, :].float().to(dev)
        out.update(lo=lo, hi=hi, mid=(hi + lo) / 2, hr=((hi - lo) / 2).clamp_min(1e-6))
    if len(_SPEC_CONSTS) > 4096:
        _SPEC_CONSTS.clear()
    _SPEC_CONSTS[key] = (objs, out)
    return out


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
    cst = _nuq_consts(spec, x.device)
    if spec.axis == "channel":  # keys: per-channel thresholds = range, calibrated offline (= key_outlier_mask)
        mask = (x > cst["hi"]) | (x < cst["lo"])
        xn = (x - cst["mid"]) / cst["hr"]
        scales: list[torch.Tensor] = []
    else:  # values: per-token online outliers and range
        mask = value_outlier_mask(x, spec.outlier_frac)
        lo16, hi16 = token_range(x, mask)
        scales = [lo16, hi16]
        lo, hi = lo16.float(), hi16.float()
        xn = (x - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-6)
    codes = torch.bucketize(xn.contiguous(), cst["mids"])  # nearest_centroid on the original table, also with Q-Norm
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
        table = torch.arange(2**spec.bits, dtype=torch.float32, device=e.codes.device)
        codes = lookup_codes(e.codes, table, spec.bits, D)
        scale, zero = (t.float() for t in e.scales)
        xg = _groups(codes, spec).mul_(scale.unsqueeze(-1)).add_(zero.unsqueeze(-1))
        x = _ungroup(xg, spec, codes.shape)
        return x if out is None else out.copy_(x)
    xn = lookup_codes(e.codes, spec.table(), spec.bits, D)
    if spec.axis == "channel":
        assert spec.lo is not None and spec.hi is not None
        lo, hi = spec.lo[None, :, None, :].float().to(xn.device), spec.hi[None, :, None, :].float().to(xn.device)
    else:
        lo, hi = (t.float() for t in e.scales)
    x = xn.mul_(((hi - lo) / 2).clamp_min(1e-6)).add_((hi + lo) / 2)
    if e.out_idx is not None and e.out_idx.numel():
        assert e.out_val is not None
        i = e.out_idx.long()  # token-major ((t * B + b) * H + h) * D + d -> [B, H, n, D] flat
        t, r = i.div(B * H * D, rounding_mode="floor"), i % (B * H * D)
        x.view(-1).index_put_(((r.div(D, rounding_mode="floor") * n + t) * D + r % D,), e.out_val.float())
    return x if out is None else out.copy_(x)


def encode_cpu(x: torch.Tensor, spec: KVSpec) -> Encoded | None:
    """:func:`encode` of a nuq spec by the fused CPU kernel's ``encode_nuq`` (``kernels/kv_decode_cpu.cpp``: the
    same float32 operations in one pass, equal bit for bit), when that kernel is loaded and ``x`` is on the CPU;
    None where it does not apply (other schemes, devices or bit widths, a tie among a value token's largest or
    smallest entries, non-finite input): the caller runs :func:`encode`.  The cache's appends use it: a decode
    step encodes one token per store, where encode()'s small torch ops cost about 0.1-0.2 ms per store."""
    mod = loaded_cpp_ops("kv_decode_cpu.cpp")
    if mod is None or spec.scheme != "nuq" or x.device.type != "cpu" or spec.bits not in (2, 3, 4, 8):
        return None
    B, H, n, D = x.shape
    if (D * spec.bits) % 32 or not x.numel():
        return None
    cst = _nuq_consts(spec, x.device)
    if spec.axis == "channel":
        lo, hi, mid, hr = (cst[k].reshape(H, D) for k in ("lo", "hi", "mid", "hr"))
        k_out = 0
    else:
        lo = hi = mid = hr = _empty((0,), torch.float32, x.device)
        k_out = max(1, int(round(spec.outlier_frac * H * D / 2))) if spec.outlier_frac > 0 else 0  # value_outlier_mask
    codes, lo16, hi16, idx, val = mod.encode_nuq(x.float().contiguous(), cst["mids"], lo, hi, mid, hr, k_out, spec.bits)
    if not codes.numel():
        return None
    return Encoded(
        (B, H, n, D),
        codes.view(torch.int32) if spec.bits == 3 else codes,
        [] if spec.axis == "channel" else [lo16, hi16],
        idx,
        val,
    )


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
        self.reader = PackedReader(spec)  # the packed decode attention's tables (built on first use)
        self._bufs: dict[str, torch.Tensor] = {}  # the growable buffers self.enc's components are views of

    @property
    def n_quant(self) -> int:
        return 0 if self.enc is None else self.enc.shape[2]

    def length(self) -> int:
        return sum(0 if t is None else t.shape[2] for t in (self.head, self.tail)) + self.n_quant

    def heads(self) -> int:
        for t in (self.head, self.tail):
            if t is not None:
                return t.shape[1]
        assert self.enc is not None
        return self.enc.shape[1]

    def append(self, x: torch.Tensor) -> None:
        x = x.half()
        n_head = 0 if self.head is None else self.head.shape[2]
        need = max(self.spec.sink - n_head, 0) if self.spec.scheme != "fp16" else 0
        if need:
            h, x = x[:, :, :need], x[:, :, need:]
            self.head = h if self.head is None else torch.cat([self.head, h], 2)
        self.tail = x if self.tail is None or not self.tail.shape[2] else torch.cat([self.tail, x], 2)
        if self.spec.scheme == "fp16":
            return
        # tokens of the tail that the eval path's rule would quantize at this length
        T = self.length()
        _, end = quantized_span(T, self.spec)
        k = end - (T - self.tail.shape[2])
        if k > 0:
            x = self.tail[:, :, :k].float()
            new = encode_cpu(x, self.spec) or encode(x, self.spec)
            self._extend(new)
            self.tail = self.tail[:, :, k:]

    def _extend(self, new: Encoded) -> None:
        """``self.enc`` followed by ``new`` (:meth:`Encoded.cat`) without copying the store: each component lives
        in a buffer with room to grow along the token axis (capacity doubles; the Encoded holds views of its
        first n tokens), so a decode step copies only its own token."""
        self.enc = new if self.enc is None else self.enc.cat(new, self._grow)

    def _grow(self, name: str, cur: torch.Tensor, add: torch.Tensor, dim: int) -> torch.Tensor:
        """The view of ``cur`` then ``add`` along ``dim`` in the store's buffer ``name`` (reallocated, twice the
        size, when full or when ``cur`` is not its prefix)."""
        used, k = cur.shape[dim], add.shape[dim]
        buf = self._bufs.get(name)
        if buf is None or buf.shape[dim] < used + k or buf.data_ptr() != cur.data_ptr() or buf.dtype != cur.dtype:
            shape = list(cur.shape)
            shape[dim] = max(used + k, 2 * used)
            buf = torch.empty(shape, dtype=cur.dtype, device=cur.device)
            buf.narrow(dim, 0, used).copy_(cur)
            self._bufs[name] = buf
        buf.narrow(dim, used, k).copy_(add)
        return buf.narrow(dim, 0, used + k)

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


# --------------------------------------------------------------------------- decode attention on the packed store


def channel_byte_lut(spec: KVSpec) -> torch.Tensor:
    """nuq keys (per-channel range): [H * D * b / 8 * 256, 8 / b] float32, for byte position p of head
    h and byte value v, the dequantized pre-RoPE keys of the 8 / b channels packed in it
    (``table[code] * half_range + mid`` with the channel's calibrated range folded in)."""
    assert spec.lo is not None and spec.hi is not None and spec.bits in (2, 4, 8)
    per = 8 // spec.bits
    lo, hi = spec.lo.float(), spec.hi.float()  # [H, D]
    H, D = lo.shape
    hr, mid = ((hi - lo) / 2).clamp_min(1e-6), (hi + lo) / 2
    base = byte_lut(spec.table(), spec.bits)  # [256, per]
    hr, mid = hr.reshape(H, D // per, 1, per), mid.reshape(H, D // per, 1, per)
    return (base.to(hr.device) * hr + mid).reshape(-1, per)  # the same float ops as decode()


class PackedReader:
    """Per-store state of the packed decode attention: lookup tables built once from the calibrated
    spec, and the outliers' (head, token, channel) coordinates, extended as the store grows."""

    def __init__(self, spec: KVSpec) -> None:
        self.spec = spec
        self.lut: torch.Tensor | None = None  # the codes' byte table ([256 or H*P*256, 8/b])
        self.offsets: torch.Tensor | None = None
        self._out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # bh, t, d of the outliers
        self.static: dict[str, Any] = {}  # the fused CPU kernel's per-store constants (code table, key ranges)

    def _codes(self, e: Encoded, table: torch.Tensor) -> torch.Tensor:
        """``table[code]`` float32 [B, H, n, D] (the byte table cached; 3 bits: :func:`lookup_codes`)."""
        if self.spec.bits == 3:
            return lookup_codes(e.codes, table, 3, e.shape[3])
        if self.lut is None:
            self.lut = byte_lut(table, self.spec.bits).to(e.codes.device)
        return lookup_codes(e.codes, table, self.spec.bits, e.shape[3], self.lut)

    def outliers(self, e: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b * H + h, t, d) int64 of the sparse outliers (token-major flat indices decomposed)."""
        assert e.out_idx is not None
        B, H, _, D = e.shape
        m = e.out_idx.numel()
        done = 0 if self._out is None else self._out[0].numel()
        if done > m:
            self._out, done = None, 0
        if done < m:
            i = e.out_idx[done:].long()
            t, r = i.div(B * H * D, rounding_mode="floor"), i % (B * H * D)
            part = (r.div(D, rounding_mode="floor"), t, r % D)
            self._out = part if self._out is None else cast(Any, tuple(torch.cat(x) for x in zip(self._out, part)))
        assert self._out is not None
        return self._out

    def keys(self, e: Encoded) -> torch.Tensor:
        """Pre-RoPE keys [B, H, n, D] float32 of the quantized span, one table gather per packed byte
        (nuq 2/4 bits: the per-channel range folded into a per-(head, byte position) table; int per
        channel: the codes gathered, then scale and zero in one fused multiply-add)."""
        spec = self.spec
        B, H, n, D = e.shape
        if spec.scheme == "nuq" and spec.axis == "channel" and spec.bits in (2, 4, 8):
            if self.lut is None:
                self.lut = channel_byte_lut(spec).to(e.codes.device)
                P = D * spec.bits // 8
                self.offsets = (torch.arange(H * P, dtype=torch.int32, device=e.codes.device) * 256).reshape(1, H, 1, P)
            assert self.offsets is not None
            k = take_rows(self.lut, e.codes.to(torch.int32).add_(self.offsets)).reshape(B, H, n, D)
        elif spec.scheme == "int" and spec.axis == "channel":
            c = self._codes(e, torch.arange(2**spec.bits, dtype=torch.float32, device=e.codes.device))
            g = spec.group_size
            scale, zero = (t.float().unsqueeze(3) for t in e.scales)  # [B, H, n/g, 1, D]
            return torch.addcmul(zero, c.view(B, H, n // g, g, D), scale).view(B, H, n, D)
        else:
            return decode(e, spec)
        if e.out_idx is not None and e.out_idx.numel():
            assert e.out_val is not None
            bh, t, d = self.outliers(e)
            k.view(-1).index_put_(((bh * n + t) * D + d,), e.out_val.float())
        return k

    def values_into(self, e: Encoded, out: torch.Tensor) -> None:
        """Write the quantized span's values (float32 [B, H, n, D], e.g. a slice of a buffer) into
        ``out``: one table gather, then the per-token scale/offset in one multiply-add, outliers put."""
        spec = self.spec
        B, H, n, D = e.shape
        if spec.axis != "token":
            out.copy_(decode(e, spec))
            return
        if spec.scheme == "int":
            c = self._codes(e, torch.arange(2**spec.bits, dtype=torch.float32, device=e.codes.device))
            scale, zero = (t.float().unsqueeze(-1) for t in e.scales)  # [B, H, n, G, 1]
            G = scale.shape[3]
            torch.addcmul(zero, c.view(B, H, n, G, D // G), scale, out=out.view(B, H, n, G, D // G))
            return
        vn = self._codes(e, spec.table())
        lo, hi = (t.float() for t in e.scales)  # [B, 1, n, 1]
        torch.addcmul((hi + lo) / 2, vn, ((hi - lo) / 2).clamp_min(1e-6), out=out)
        if e.out_idx is not None and e.out_idx.numel():
            assert e.out_val is not None
            bh, t, d = self.outliers(e)
            out.index_put_((bh.div(H, rounding_mode="floor"), bh % H, t, d), e.out_val.float())

    def attend_values(self, p: torch.Tensor, e: Encoded) -> torch.Tensor:
        """``p @ V`` [B, H, rep, D] for softmax weights p [B, H, rep, n] over the quantized span, with
        the per-token scale/offset folded into the weights: V = code_value * s_t + z_t, so
        p @ V = (p * s) @ code_value + p @ z (per channel group), sparse outliers added separately."""
        spec = self.spec
        B, H, n, D = e.shape
        if spec.axis != "token":
            return p @ decode(e, spec)
        if spec.scheme == "int":
            c = self._codes(e, torch.arange(2**spec.bits, dtype=torch.float32, device=e.codes.device))
            scale, zero = (t.float() for t in e.scales)  # [B, H, n, G]
            G = scale.shape[-1]
            g = D // G
            if G == 1:
                return (p * scale.transpose(-1, -2)) @ c + p @ zero
            w = p.unsqueeze(-1) * scale.unsqueeze(2)  # [B, H, rep, n, G]
            out = torch.einsum("bhrng,bhngk->bhrgk", w, c.view(B, H, n, G, g))
            return out.reshape(*p.shape[:3], D) + (p @ zero).repeat_interleave(g, -1)
        # nuq per token (all heads share a token's range): V = table[code] * hr_t + mid_t
        vn = self._codes(e, spec.table())
        lo, hi = (t.float().reshape(B, 1, 1, n) for t in e.scales)  # [B, 1, n, 1] stored
        hr, mid = ((hi - lo) / 2).clamp_min(1e-6), (hi + lo) / 2
        out = (p * hr) @ vn
        out += (p * mid).sum(-1, keepdim=True)
        if e.out_idx is not None and e.out_idx.numel():
            assert e.out_val is not None
            bh, t, d = self.outliers(e)
            bht = bh * n + t
            bt = bh.div(H, rounding_mode="floor") * n + t
            deq = vn.view(-1)[bht * D + d] * hr.view(-1)[bt] + mid.view(-1)[bt]
            corr = e.out_val.float() - deq  # the outlier minus what the dense part reconstructed there
            rep = p.shape[2]
            pw = p.transpose(2, 3).reshape(B * H * n, rep)[bht]  # [n_out, rep]
            acc = torch.zeros(B * H * D, rep, dtype=out.dtype, device=out.device)
            acc.index_add_(0, bh * D + d, pw * corr.unsqueeze(1))
            out += acc.view(B, H, D, rep).transpose(-1, -2)
        return out


def packed_decode_attention(
    q: torch.Tensor,
    k_store: _KVStore,
    v_store: _KVStore,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step's attention [B, H_q, 1, D] straight from the packed stores.

    q [B, H_q, 1, D] (post-RoPE query); the stores hold fp16 sink tokens, the packed span and the
    fp16 window; ``rope`` (cos, sin) [1, 1, >= T, D] rotates the stored pre-RoPE keys (None: keys
    are stored as attended).  Keys of the packed span are rebuilt by one table gather per byte
    (scales folded into the table) and rotated, the scores are one matmul per KV head for its
    query heads (GQA without repeating K/V), and the values' per-token scale/offset are folded into
    the softmax weights (:meth:`PackedReader.attend_values`).  ``mask``: [B, 1, 1, T] bool (True =
    attend) or additive float.  Equals dequantize-then-attend (:func:`decode_attention_dense`).
    """
    B, Hq, _, D = q.shape
    ek, ev = k_store.enc, v_store.enc
    H = k_store.heads()
    rep = Hq // H
    qg = q.float().reshape(B, H, rep, D)
    s = 0 if k_store.head is None else k_store.head.shape[2]
    n = k_store.n_quant
    T = k_store.length()
    kparts: list[torch.Tensor] = []
    if s:
        assert k_store.head is not None
        kparts.append(k_store.head.float())
    if n:
        assert ek is not None
        kparts.append(k_store.reader.keys(ek))
    if k_store.tail is not None and k_store.tail.shape[2]:
        kparts.append(k_store.tail.float())
    scores = []
    pos = 0
    for k in kparts:
        m = k.shape[2]
        if rope is not None:
            cos, sin = rope[0][:, :, pos : pos + m].float(), rope[1][:, :, pos : pos + m].float()
            h = D // 2
            kr = k * cos
            kr[..., :h].addcmul_(k[..., h:], sin[..., :h], value=-1)
            kr[..., h:].addcmul_(k[..., :h], sin[..., h:])
            k = kr
        scores.append(qg @ k.transpose(-1, -2))
        pos += m
    sc = (torch.cat(scores, -1) if len(scores) > 1 else scores[0]).mul_(scaling)  # [B, H, rep, T]
    if mask is not None:
        mk = mask[..., -T:].reshape(B, 1, 1, T)
        sc = sc.masked_fill(~mk, -torch.inf) if mk.dtype == torch.bool else sc + mk.float()
    p = sc.softmax(-1)
    sv = 0 if v_store.head is None else v_store.head.shape[2]
    nv = v_store.n_quant
    out = torch.zeros(B, H, rep, D, dtype=torch.float32, device=q.device)
    if sv:
        assert v_store.head is not None
        out += p[..., :sv] @ v_store.head.float()
    if nv:
        assert ev is not None
        out += v_store.reader.attend_values(p[..., sv : sv + nv], ev)
    if v_store.tail is not None and v_store.tail.shape[2]:
        out += p[..., sv + nv :] @ v_store.tail.float()
    return out.reshape(B, Hq, 1, D).to(q.dtype)


def fused_decode_attention(
    q: torch.Tensor,
    k_store: _KVStore,
    v_store: _KVStore,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step's attention [B, H_q, 1, D] with one fused SDPA call: the packed span's keys are
    gathered from the scale-folded tables (:meth:`PackedReader.keys`) and rotated straight into one
    float32 K buffer, its values written as ``code_value * s + z`` (one multiply-add, outliers put in
    place) into one V buffer, sink and window copied beside them; then SDPA with GQA (no repeated
    K/V).  Same inputs and result as :func:`packed_decode_attention` (the scale-folding variant):
    on CPU this one runs fewer, larger ops (``scripts/kv_decode_bench.py --attention-only``)."""
    B, Hq, _, D = q.shape
    H = k_store.heads()
    T = k_store.length()
    kb = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
    pos = 0
    for part in (k_store.head, "enc", k_store.tail):
        if part is None:
            continue
        if isinstance(part, str):
            if not k_store.n_quant:
                continue
            assert k_store.enc is not None
            k = k_store.reader.keys(k_store.enc)
        else:
            k = part.float()
        m = k.shape[2]
        if not m:
            continue
        dst = kb[:, :, pos : pos + m]
        if rope is None:
            dst.copy_(k)
        else:
            cos, sin = rope[0][:, :, pos : pos + m].float(), rope[1][:, :, pos : pos + m].float()
            h = D // 2
            torch.mul(k, cos, out=dst)
            dst[..., :h].addcmul_(k[..., h:], sin[..., :h], value=-1)
            dst[..., h:].addcmul_(k[..., :h], sin[..., h:])
        pos += m
    vb = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
    sv = 0 if v_store.head is None else v_store.head.shape[2]
    nv = v_store.n_quant
    if sv:
        assert v_store.head is not None
        vb[:, :, :sv] = v_store.head
    if nv:
        assert v_store.enc is not None
        v_store.reader.values_into(v_store.enc, vb[:, :, sv : sv + nv])
    if v_store.tail is not None and v_store.tail.shape[2]:
        vb[:, :, sv + nv :] = v_store.tail
    am = None
    if mask is not None:
        am = mask[..., -T:].reshape(B, 1, 1, T)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), kb, vb, attn_mask=am, scale=scaling, enable_gqa=Hq != H
    )
    return out.to(q.dtype)


# --------------------------------------------------------------------------- fused CPU decode kernel

def load_cpu_decode_kernel() -> Any:
    """The fused CPU decode-attention kernel (``kernels/kv_decode_cpu.cpp``) as the operator
    ``torch.ops.<name>.decode_attention`` (:func:`~quantbench.kernels.cpp.load_cpp_ops`), or None where it cannot
    be built: callers fall back to :func:`packed_decode_attention`.  Without AVX-512 (or at head dims other than
    64/128, or 8-bit codes) the kernel runs its portable loops."""
    return load_cpp_ops("kv_decode_cpu.cpp", "quantbench_kv_decode", "QB_KV_NS")


_EMPTY: dict[tuple[Any, ...], torch.Tensor] = {}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A cached empty tensor (the kernel's "none" arguments; allocating them every step costs more than the kernel's
    work on a short window)."""
    key = (shape, dtype, dev)
    if key not in _EMPTY:
        _EMPTY[key] = torch.empty(shape, dtype=dtype, device=dev)
    return _EMPTY[key]


def _fp16_part(t: torch.Tensor | None, B: int, H: int, D: int, dev: torch.device) -> torch.Tensor:
    return _empty((B, H, 0, D), torch.float16, dev) if t is None else t.contiguous()


def _token_range_ad(cache: dict[str, Any], scales: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nuq per-token values: the kernel's (a, z) = (half range, midpoint) [B, 1, n, 1] float32 of the stored fp16
    (lo, hi), computed once per token (extended in place as the store grows; capacity doubles)."""
    done = cache.get("tok_n", 0)
    if done > n:
        done = 0
    if done < n:
        lo, hi = (t[:, :, done:n].float() for t in scales)
        if done == 0 or cache["tok_a"].shape[2] < n:
            cap = max(n, 2 * done)
            a, z = (torch.empty(*lo.shape[:2], cap, 1, device=lo.device) for _ in range(2))
            if done:
                a[:, :, :done], z[:, :, :done] = cache["tok_a"][:, :, :done], cache["tok_z"][:, :, :done]
            cache["tok_a"], cache["tok_z"] = a, z
        cache["tok_a"][:, :, done:n] = ((hi - lo) / 2).clamp_min(1e-6)
        cache["tok_z"][:, :, done:n] = (hi + lo) / 2
        cache["tok_n"] = n
    return cache["tok_a"][:, :, :n], cache["tok_z"][:, :, :n]


def _store_args(st: _KVStore, B: int, H: int, D: int, dev: torch.device) -> list[Any]:
    """The kernel's arguments for one store: sink, codes (uint8 rows), code table, scale/offset
    ``a``, ``z`` [B, HS, NR, NC] with token / channel group sizes, outliers, window, bits."""
    spec, e = st.spec, st.enc
    none = _empty((0,), torch.float32, dev)
    nol = _empty((0,), torch.int32, dev)
    head, tail = _fp16_part(st.head, B, H, D, dev), _fp16_part(st.tail, B, H, D, dev)
    if e is None or not e.shape[2]:
        return [head, _empty((0,), torch.uint8, dev), none, none, none, 1, 1, nol, none, tail, 8]
    codes = e.codes if e.codes.stride(-1) == 1 else e.codes.contiguous()  # the store's view: rows in its buffer
    if spec.bits == 3:  # the int32 bit stream as little-endian bytes
        codes = codes.view(torch.uint8)
    cache = st.reader.static
    if "tab" not in cache:
        int_tab = spec.scheme == "int"
        tab = torch.arange(2**spec.bits, dtype=torch.float32, device=dev) if int_tab else spec.table().float()
        cache["tab"] = tab.contiguous().to(dev)
    if spec.scheme == "int":
        a, z = (t.float() for t in e.scales)
        tg, cg = (spec.group_size, 1) if spec.axis == "channel" else (1, D // a.shape[-1])
    elif spec.axis == "channel":
        if cache.get("B") != B:
            cst = _nuq_consts(spec, dev)  # encode()'s half range and midpoint [1, H, 1, D]
            cache["a"], cache["z"] = (cst[k].expand(B, H, 1, D).contiguous() for k in ("hr", "mid"))
            cache["B"] = B
        a, z, tg, cg = cache["a"], cache["z"], 1 << 40, 1  # one scale row for all tokens
    else:  # nuq per token: the token's inlier range over all heads
        a, z = _token_range_ad(cache, e.scales, e.shape[2])
        tg, cg = 1, D
    outl = [nol, none]
    if e.out_idx is not None and e.out_idx.numel():
        assert e.out_val is not None
        outl = [e.out_idx.contiguous(), e.out_val.contiguous()]
    return [head, codes, cache["tab"], a.contiguous(), z.contiguous(), tg, cg, *outl, tail, spec.bits]


def cpu_fused_applies(q: torch.Tensor, k_store: _KVStore, v_store: _KVStore) -> bool:
    """Whether :func:`cpu_decode_attention` handles this step: CPU tensors, head dim a power of two
    >= 32, codes of 2/3/4/8 bits (or no packed span) and the kernel built."""
    D = q.shape[-1]
    if q.device.type != "cpu" or D % 32 or D & (D - 1):
        return False
    for st in (k_store, v_store):
        if st.n_quant and (st.spec.bits not in (2, 3, 4, 8) or st.spec.scheme not in ("int", "nuq")):
            return False
    return load_cpu_decode_kernel() is not None


def cpu_decode_attention(
    q: torch.Tensor,
    k_store: _KVStore,
    v_store: _KVStore,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`packed_decode_attention`'s computation in one C++ pass per store (CPU,
    ``kernels/kv_decode_cpu.cpp``): for each token and KV head the key row is decoded from its codes
    (table, scale/offset), rotated and dotted with the KV head's query heads; softmax; the value rows
    are decoded the same way and accumulated with the weights; sparse outliers enter as per-token
    corrections ((value - dense) x score coefficient / softmax weight).  No T x D float buffer.  Same
    inputs and result as :func:`packed_decode_attention` (float32 arithmetic); requires
    :func:`cpu_fused_applies`."""
    mod = load_cpu_decode_kernel()
    assert mod is not None, "cpu_decode_attention: the kernel could not be built"
    B, Hq, _, D = q.shape
    H = k_store.heads()
    T = k_store.length()
    qs = (q.float() * scaling).reshape(B, H, Hq // H, D).contiguous()
    if rope is None:
        cos = sin = _empty((0,), torch.float32, q.device)
    else:
        cos, sin = (r.reshape(-1, D)[:T].float().contiguous() for r in rope)
    mk = _empty((0,), torch.float32, q.device)
    if mask is not None:
        m = mask[..., -T:].reshape(B, T)
        if m.dtype == torch.bool:
            mk = torch.zeros(B, T, device=q.device).masked_fill_(~m, -torch.inf)
        else:
            mk = m.float().contiguous()
    out = mod.decode_attention(
        qs, cos, sin, mk, *_store_args(k_store, B, H, D, q.device), *_store_args(v_store, B, H, D, q.device)
    )
    return out.reshape(B, Hq, 1, D).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_store: _KVStore,
    v_store: _KVStore,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step's attention on the packed stores: :func:`cpu_decode_attention` where it applies
    (CPU), else :func:`packed_decode_attention` (the torch path, any device)."""
    if cpu_fused_applies(q, k_store, v_store):
        return cpu_decode_attention(q, k_store, v_store, scaling, rope, mask)
    return packed_decode_attention(q, k_store, v_store, scaling, rope, mask)


def decode_attention_dense(
    q: torch.Tensor,
    k_store: _KVStore,
    v_store: _KVStore,
    scaling: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference of :func:`packed_decode_attention`: dequantize both stores, rotate, attend (float64)."""
    B, Hq, _, D = q.shape
    k = k_store.materialize(torch.float64)
    v = v_store.materialize(torch.float64)
    T = k.shape[2]
    if rope is not None:
        k = apply_rope(k, rope[0][:, :, :T].double(), rope[1][:, :, :T].double())
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    return (s.softmax(-1) @ v).to(q.dtype)


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
    for positions 0..T-1 (``rotary`` = the model's rotary embedding, or one per layer (Gemma 3: local and
    global RoPE); None for models without RoPE).

    Packed decode: after ``cache.set_packed_decode(True)``, with the model's attention
    implementation set to :data:`PACKED_ATTENTION` (:func:`register_packed_attention`), a one-token
    step returns nothing dequantized: the layer leaves itself on its capture
    (``pending_attention``) and the attention runs on the packed store
    (:func:`decode_attention`: the fused CPU kernel or :func:`packed_decode_attention`); prefill and
    multi-token steps keep the dequantize path.
    """

    def __new__(
        cls, specs: list[tuple[KVSpec, KVSpec]], rotary: Any = None, captures: list[Any] | None = None
    ) -> Any:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        class QuantizedKVLayer(DynamicLayer):
            def __init__(self, k_spec: KVSpec, v_spec: KVSpec, capture: Any, rope: RopeTable | None) -> None:
                super().__init__()
                self.k_store, self.v_store = _KVStore(k_spec), _KVStore(v_spec)
                self.capture, self.rope = capture, rope
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
                if packed["on"] and key_states.shape[2] == 1 and self.capture is not None:
                    # decode step: the attention (packed_attention_forward) reads the packed stores
                    self.capture.pending_attention = self
                    return key_states, value_states
                keys = self.k_store.materialize(self.dtype)
                if self.rope is not None and self.capture is not None:
                    keys = apply_rope(keys, *self.rope.get(keys.shape[2], keys))
                return keys, self.v_store.materialize(self.dtype)

            def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
                r = None
                if self.rope is not None and self.capture is not None:
                    r = self.rope.get(self.k_store.length(), query)
                return decode_attention(query, self.k_store, self.v_store, scaling, r, mask)

            def get_seq_length(self) -> int:
                return self.k_store.length()

            def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
                return self.get_seq_length() + query_length, 0

        caps = captures or [None] * len(specs)
        packed = {"on": False}  # set by set_packed_decode(), with the model on PACKED_ATTENTION
        rotaries = list(rotary) if isinstance(rotary, (list, tuple)) else [rotary] * len(specs)
        tables = {id(r): RopeTable(r) for r in rotaries if r is not None}  # layers sharing a rotary share its table
        ropes = [None if r is None else tables[id(r)] for r in rotaries]
        # list[Any]: Cache.__init__'s (invariant) list element type differs across transformers versions
        layers: list[Any] = [QuantizedKVLayer(k, v, c, r) for (k, v), c, r in zip(specs, caps, ropes, strict=True)]
        cache: Any = DynamicCache.__new__(DynamicCache)  # a DynamicCache given a kv_bytes() attribute below
        from transformers.cache_utils import Cache

        Cache.__init__(cache, layers=layers)
        cache.kv_bytes = lambda: kv_bytes(cache)
        cache.set_packed_decode = lambda on: packed.update(on=bool(on))
        return cache


PACKED_ATTENTION = "quantbench_packed_kv"


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: a :class:`QuantizedKVCache` decode step left pending on the
    module's k_proj capture attends on the packed store; anything else goes to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap = getattr(module, "k_proj", None)
    layer = getattr(cap, "pending_attention", None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cap.pending_attention = None  # type: ignore[union-attr]
    out = layer.attend(query, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register :func:`packed_attention_forward` (with SDPA's mask) as :data:`PACKED_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


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
    "PackedReader",
    "packed_decode_attention",
    "decode_attention_dense",
    "fused_decode_attention",
    "cpu_decode_attention",
    "cpu_fused_applies",
    "decode_attention",
    "load_cpu_decode_kernel",
    "channel_byte_lut",
    "PACKED_ATTENTION",
    "packed_attention_forward",
    "register_packed_attention",
]
