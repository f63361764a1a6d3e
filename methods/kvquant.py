"""KVQuant (Hooper et al., 2024, arXiv:2401.18079) and its KV-cache baselines.

KVQuant, in the paper's order:
1. Per-channel key quantization, 2. pre-RoPE keys (quantize k_proj's output; where the attention normalizes
   its keys before RoPE, Gemma 3 and Qwen 3's ``k_norm``, the normalized keys: :class:`NormedKeys`),
3. non-uniform datatype (NUQ): per layer, 2^b centroids from sensitivity-weighted k-means over
   normalized calibration activations, weights = Fisher information (squared gradients of the
   calibration loss w.r.t. the K/V activations; ``fisher=False``: uniform weights),
4. per-vector dense-and-sparse: ``outlier_frac / 2`` at each end of every channel (keys: lower
   and upper thresholds calibrated offline, which are also the channel's normalization range) /
   token over all KV heads (values: online, range = the inliers' min/max) kept in fp16,
   5. Q-Norm (for 2 bits): codes are assigned against the k-means centroids; the reconstruction
   ``centroid * scale + offset`` is shifted/scaled so the quantized calibration data keeps the
   mean and std of the normalized data, 6. attention sink: the first ``sink`` tokens in fp16.

Baselines: ``kv-fp16`` (K/V rounded to fp16), ``kv-uniform`` (per-token asymmetric int-b with
``group_size`` channels), ``kivi`` (Liu et al., 2024, Algorithm 1: keys per channel in groups of
``group_size`` tokens, every full block of R = ``residual_length`` tokens quantized and the T mod R
newest in fp16; values per token in groups of ``group_size`` channels, the R newest in fp16).

Execution: the evaluation path wraps k_proj/v_proj (whatever their class, so it composes with
weight methods) and quantize-dequantizes the whole sequence in the forward pass.  Keys are
quantized pre-RoPE for every method here (KIVI and the naive baseline quantize post-RoPE keys in
their papers: a documented deviation).  KIVI's eval path keeps in fp16 what its cache holds in
fp16 after prefilling the whole window: the T mod R newest keys and the R newest values.  The
real cache quantizes a decode step's token block before that step's attention (KIVI's reference
attends first, then quantizes: the newest key block/value is seen once in fp16 more).  The real cache
(:func:`make_cache`) stores keys pre-RoPE (captured from k_proj) and re-applies RoPE after
dequantization, as the paper does; it holds packed codes, fp16 scales and sparse outliers and
reports ``kv_bytes()`` from those buffers.  :func:`generate_with_cache` (the latency metrics' and
the KV decode benchmark's decode) runs each one-token step's attention on the packed store
(:func:`quantbench.kernels.kvcache.decode_attention`: on CPU one fused C++ pass per store,
:func:`~quantbench.kernels.kvcache.cpu_decode_attention`; elsewhere
:func:`~quantbench.kernels.kvcache.packed_decode_attention`, key scales folded into lookup tables,
value scales into the softmax weights; no dequantized K/V copy either way); prefill and the
evaluation path are unchanged.  :func:`make_cache` builds the real quantized cache
(:class:`quantbench.kernels.kvcache.QuantizedKVCache`) from the same per-layer specs.

Each method class declares ``target = "kv"`` and owns its cache (``make_cache``, ``generate``) and
that cache's byte formula (``kv_cache_bytes``; :mod:`quantbench.methods.kvcalc` looks it up by name).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.kvcache import (
    KVSpec,
    QuantizedKVCache,
    load_cpu_decode_kernel,
    q_norm,
    qdq_sequence,
    register_packed_attention,
    token_range,
    value_outlier_mask,
    weighted_kmeans_1d,
)
from .base import (
    Calibration,
    ConfigError,
    Method,
    MethodConfig,
    QuantizedModule,
    model_fingerprint,
    register,
)
from .kvcalc import OUTLIER_BYTES, cache_bytes, fp16_cache_bytes, head_dim_of, kv_heads_of
from .placement import forward_for_hooks, model_device
from .timing import greedy_decode

log = logging.getLogger(__name__)

PROTOCOL_EVAL = "kv-qdq-forward"  # K/V quantize-dequantized over the whole window in the forward
PROTOCOL_CACHE = "kv-real-cache"  # real packed cache during generation
CALC_TOKENS = 4096  # context at which the artifacts' calculator bytes/token are amortized
KMEANS_MAX_POINTS = 500_000


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KVFP16Config(MethodConfig):
    pass


@dataclass(frozen=True)
class KVUniformConfig(MethodConfig):
    bits: int = 4
    group_size: int = -1  # channels per group within a token; -1 = the whole head dim

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"kv-uniform: bits must be one of [2, 3, 4, 8], got {self.bits}")
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"kv-uniform: group_size must be in 1..{1 << 20} or -1, got {self.group_size}")


@dataclass(frozen=True)
class KIVIConfig(MethodConfig):
    bits: int = 2
    group_size: int = 32
    residual_length: int = 32

    # 2: keys quantize every full block of residual_length tokens (T mod R in fp16, was R + T mod g);
    #    values keep exactly the residual_length newest tokens in fp16
    version: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"kivi: bits must be one of [2, 3, 4, 8], got {self.bits}")
        if not 0 < self.group_size <= 1 << 20 or not 0 <= self.residual_length <= 1_000_000:
            raise ConfigError(f"kivi: group_size must be in 1..{1 << 20} and residual_length in 0..1000000, "
                              f"got {self.group_size} and {self.residual_length}")
        if self.residual_length % self.group_size:
            raise ConfigError(f"kivi: residual_length ({self.residual_length}) must be a multiple of group_size "
                              f"({self.group_size}): the key window is quantized as whole groups")


@dataclass(frozen=True)
class KVQuantConfig(MethodConfig):
    # 2: keys' lower/upper per-channel thresholds are the range; values per token over all heads
    # 3: max_calib_samples defaults to the paper's 16 (was 4)
    # 4: Q-Norm assigns codes against the k-means centroids and rescales the reconstruction
    version: ClassVar[int] = 4
    bits: int = 4
    outlier_frac: float = 0.01
    sink: int = 1
    fisher: bool = True
    qnorm: bool | None = None  # None: on for 2 bits (as in the paper)
    kmeans_iters: int = 50
    max_calib_samples: int = 16  # the paper's nsamples

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"kvquant: bits must be one of [2, 3, 4], got {self.bits}")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise ConfigError(f"kvquant: outlier_frac must be in [0, 0.5), got {self.outlier_frac}")
        if not 0 <= self.sink <= 1_000_000:
            raise ConfigError(f"kvquant: sink must be in 0..1000000, got {self.sink}")
        for k in ("kmeans_iters", "max_calib_samples"):
            if not 0 < getattr(self, k) <= 1_000_000:
                raise ConfigError(f"kvquant: {k} must be in 1..1000000, got {getattr(self, k)}")


# --------------------------------------------------------------------------- wiring


class KVProj(nn.Module):
    """Wraps a k_proj/v_proj (any module) and quantize-dequantizes its output per head.

    ``mode``: "qdq" (evaluation path), "off", "record" (keep output for calibration, as a leaf
    requiring grad when ``record_grad``), "capture" (hand the pre-RoPE output to the real cache).
    """

    def __init__(self, inner: nn.Module, spec: KVSpec, head_dim: int) -> None:
        super().__init__()
        self.inner, self.spec, self.head_dim = inner, spec, head_dim
        self.mode = "qdq"
        self.record_grad = False
        self.recorded: list[torch.Tensor] = []
        self.captured: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        B, T, HD = y.shape
        if self.mode == "record":
            if self.record_grad:
                y = y.detach().requires_grad_(True)
            self.recorded.append(y)
            return y
        if self.mode == "capture":
            self.captured = y.reshape(B, T, HD // self.head_dim, self.head_dim).transpose(1, 2)
            return y
        if self.mode == "off":
            return y
        yh = y.reshape(B, T, HD // self.head_dim, self.head_dim).transpose(1, 2)
        return qdq_sequence(yh, self.spec).transpose(1, 2).reshape(B, T, HD)


class NormedKeys(nn.Module):
    """k_proj followed by the attention's per-head key norm (Gemma 3, Qwen 3: ``k_norm`` before RoPE), output
    [B, T, H * D]: the keys the cache holds.  :func:`install` moves ``k_norm`` in here (the attention's
    ``k_norm`` becomes an identity), so the key wrapper quantizes normalized keys.  The norm acts on each
    head's D-vector, so it gives what the attention's own call on its [B, H, T, D] view gives."""

    def __init__(self, proj: nn.Module, norm: nn.Module, head_dim: int) -> None:
        super().__init__()
        self.proj, self.norm, self.head_dim = proj, norm, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        B, T, HD = y.shape
        return self.norm(y.view(B, T, HD // self.head_dim, self.head_dim)).reshape(B, T, HD)


def _key_norm(attn: nn.Module) -> nn.Module | None:
    """The attention's key norm applied before RoPE (``k_norm``), if it has one not yet moved."""
    norm = getattr(attn, "k_norm", None)
    return norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None


class FusedQKV(nn.Module):
    """A fused q/k/v projection (Phi-3's ``qkv_proj``, output ``[q | k | v]``) whose K and V slices go through
    the key and value wrappers ``k``, ``v`` (:class:`KVProj` around an identity): the keys and values the
    attention reads are quantized, as a model with k_proj/v_proj has them."""

    def __init__(self, inner: nn.Module, k: KVProj, v: KVProj, q_width: int, kv_width: int) -> None:
        super().__init__()
        self.inner, self.k, self.v = inner, k, v
        self.widths = [q_width, kv_width, kv_width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.inner(x).split(self.widths, dim=-1)
        return torch.cat([q, self.k(k), self.v(v)], dim=-1)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules with k_proj and v_proj (llama, OPT, ...) or a fused qkv_proj (Phi-3), in layer
    order."""
    return [m for m in model.modules()
            if (hasattr(m, "k_proj") and hasattr(m, "v_proj")) or isinstance(getattr(m, "qkv_proj", None), nn.Module)]


def _kv_pair(attn: nn.Module) -> tuple[KVProj, KVProj] | None:
    fused = getattr(attn, "qkv_proj", None)
    if isinstance(fused, FusedQKV):
        return fused.k, fused.v
    k = getattr(attn, "k_proj", None)
    return (k, cast(KVProj, attn.v_proj)) if isinstance(k, KVProj) else None  # install() wraps both together


def kv_wrappers(model: nn.Module) -> list[tuple[KVProj, KVProj]]:
    return [p for p in map(_kv_pair, attention_modules(model)) if p is not None]


def install(model: nn.Module, specs: list[tuple[KVSpec, KVSpec]]) -> None:
    hd = head_dim_of(model)
    cfg: Any = model.config  # the transformers config
    for attn, (ks, vs) in zip(attention_modules(model), specs, strict=True):
        fused = getattr(attn, "qkv_proj", None)
        if isinstance(fused, FusedQKV):
            fused.k.spec, fused.v.spec = ks, vs
            continue
        if isinstance(fused, nn.Module):  # [q | k | v] widths from the config (the inner may be quantized)
            kv = kv_heads_of(model) * hd
            attn.qkv_proj = FusedQKV(fused, KVProj(nn.Identity(), ks, hd), KVProj(nn.Identity(), vs, hd),
                                     cfg.num_attention_heads * hd, kv)
            continue
        for name, spec in (("k_proj", ks), ("v_proj", vs)):
            mod = getattr(attn, name)
            if isinstance(mod, KVProj):
                mod.spec = spec
                continue
            norm = _key_norm(attn) if name == "k_proj" else None
            if norm is not None:  # quantize the keys after k_norm, as the cache holds them
                mod = NormedKeys(mod, norm, hd)
                attn.k_norm = nn.Identity()
            setattr(attn, name, KVProj(mod, spec, hd))


def set_mode(model: nn.Module, mode: str) -> None:
    for k, v in kv_wrappers(model):
        k.mode = v.mode = mode


def model_specs(model: nn.Module) -> list[tuple[KVSpec, KVSpec]]:
    return [(k.spec, v.spec) for k, v in kv_wrappers(model)]


# --------------------------------------------------------------------------- methods


class _KVMethod(Method):
    """A KV-cache method: per-layer K/V specs, the real cache (:func:`make_cache`) and its byte formula."""

    target = "kv"

    def layer_specs(self, model: nn.Module, calib: Calibration | None) -> list[tuple[KVSpec, KVSpec]]:
        raise NotImplementedError

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        t0 = time.perf_counter()
        specs = self.layer_specs(model, calib)
        install(model, specs)
        set_mode(model, "qdq")
        self.artifacts["protocol"] = PROTOCOL_EVAL
        self.artifacts["kv_layers"] = len(specs)
        b = self.kv_cache_bytes(n_layers=len(specs), n_kv_heads=kv_heads_of(model), head_dim=head_dim_of(model),
                                tokens=CALC_TOKENS)
        self.artifacts["calc_bytes_per_token"] = b["total"] / CALC_TOKENS
        self.artifacts["seconds"] = round(time.perf_counter() - t0, 3)
        return model

    def make_cache(self, model: nn.Module) -> Any:
        return make_cache(model)

    def generate(self, model: nn.Module, input_ids: torch.Tensor, n_new: int, cache: Any,
                 times: list[float] | None = None) -> torch.Tensor:
        return generate_with_cache(model, input_ids, n_new, cache, times)


@register
class KVFP16(_KVMethod):
    """The fp16 KV cache baseline: K/V rounded to fp16."""

    name = "kv-fp16"
    config_cls = KVFP16Config

    def layer_specs(self, model: nn.Module, calib: Calibration | None) -> list[tuple[KVSpec, KVSpec]]:
        return [(KVSpec(), KVSpec()) for _ in attention_modules(model)]

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        return fp16_cache_bytes(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, tokens=tokens,
                                batch=batch)


@register
class KVUniform(_KVMethod):
    """Naive per-token asymmetric int-b KV quantization (groups of channels)."""

    name = "kv-uniform"
    config_cls = KVUniformConfig

    def layer_specs(self, model: nn.Module, calib: Calibration | None) -> list[tuple[KVSpec, KVSpec]]:
        c: KVUniformConfig = self.config  # type: ignore[assignment]
        s = KVSpec("int", "token", c.bits, c.group_size)
        return [(s, s) for _ in attention_modules(model)]

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        """int-b codes and an fp16 scale + zero per group of channels, for K and V."""
        c: KVUniformConfig = self.config  # type: ignore[assignment]
        L, H, D, T, B = n_layers, n_kv_heads, head_dim, tokens, batch
        g = D if c.group_size in (-1, 0) else c.group_size
        return cache_bytes(codes=2 * L * B * H * T * D * c.bits / 8, scales=2 * L * B * H * T * (D // g) * 4)


@register
class KIVI(_KVMethod):
    """KIVI (Liu et al., 2024): per-channel keys, per-token values, fp16 recent window."""

    name = "kivi"
    config_cls = KIVIConfig

    def layer_specs(self, model: nn.Module, calib: Calibration | None) -> list[tuple[KVSpec, KVSpec]]:
        c: KIVIConfig = self.config  # type: ignore[assignment]
        hd = head_dim_of(model)
        # keys: every full block of R tokens (R = residual_length, or group_size when 0) quantized
        ks = KVSpec("int", "channel", c.bits, c.group_size, span_group=c.residual_length or c.group_size)
        # values: per token (groups of group_size channels); the R newest tokens stay fp16
        vs = KVSpec("int", "token", c.bits, c.group_size if hd % c.group_size == 0 else -1, residual=c.residual_length)
        return [(ks, vs) for _ in attention_modules(model)]

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        """Keys: every full block of R tokens quantized (fp16 scale + zero per channel and group of
        ``group_size`` tokens), the T mod R newest in fp16; values: all but the R newest quantized (fp16
        scale + zero per token and channel group), those R in fp16."""
        c: KIVIConfig = self.config  # type: ignore[assignment]
        L, H, D, T, B = n_layers, n_kv_heads, head_dim, tokens, batch
        b, g, r = c.bits, c.group_size, c.residual_length
        tk = T // (r or g) * (r or g)
        tv = max(T - r, 0)
        gv = g if D % g == 0 else D
        return cache_bytes(codes=L * B * H * (tk + tv) * D * b / 8,
                           scales=L * B * H * ((tk // g) * D * 4 + tv * (D // gv) * 4),
                           fp16=L * B * H * (2 * T - tk - tv) * D * 2)


@register
class KVQuant(_KVMethod):
    """KVQuant: pre-RoPE per-channel keys, per-token values, Fisher-weighted NUQ, dense-and-sparse."""

    name = "kvquant"
    config_cls = KVQuantConfig
    needs_calibration = True

    def layer_specs(self, model: nn.Module, calib: Calibration | None) -> list[tuple[KVSpec, KVSpec]]:
        c: KVQuantConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ConfigError("kvquant needs calibration data")
        (keys, vals, kgrad, vgrad), reused = cached_record_kv(model, calib, c.fisher, c.max_calib_samples, c.sink)
        qn = qnorm_on(c)
        specs, summary = [], []
        for i in range(len(keys)):
            ks = calibrate_keys(keys[i], kgrad[i], c, qn)
            vs = calibrate_values(vals[i], vgrad[i], c, qn)
            assert ks.centroids is not None and vs.centroids is not None  # nuq specs carry centroids
            specs.append((ks, vs))
            summary.append(
                {
                    "layer": i,
                    "k_centroids": [round(float(x), 4) for x in ks.centroids],
                    "v_centroids": [round(float(x), 4) for x in vs.centroids],
                    "qnorm_scale_offset": [ks.qnorm, vs.qnorm],
                }
            )
        self.artifacts["centroids"] = summary[:: max(1, len(summary) // 4)]
        self.artifacts["outlier_frac"] = c.outlier_frac
        self.artifacts["fisher"] = c.fisher
        self.artifacts["qnorm"] = qn
        self.artifacts["calib_tokens"] = int(keys[0].shape[0])
        self.artifacts["calib_recording_reused"] = reused
        return specs

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        """b-bit codes after the fp16 sink tokens; values' fp16 range per token (over all KV heads); sparse
        outliers at OUTLIER_BYTES each (values: the ``outlier_frac / 2`` largest and smallest of each token,
        at least one each); static: keys' fp16 lower/upper thresholds per channel and the centroids."""
        c: KVQuantConfig = self.config  # type: ignore[assignment]
        L, H, D, T, B = n_layers, n_kv_heads, head_dim, tokens, batch
        b, f = c.bits, c.outlier_frac
        s = min(c.sink, T)
        tq = T - s
        kout = key_outliers if key_outliers is not None else L * B * H * tq * D * f
        vout = L * B * tq * 2 * max(1, int(round(f * H * D / 2))) if f > 0 else 0
        return cache_bytes(codes=2 * L * B * H * tq * D * b / 8, scales=L * B * tq * 4,
                           outliers=(kout + vout) * OUTLIER_BYTES, fp16=2 * L * B * H * s * D * 2,
                           static=L * (2 * H * D * 2 + 2 * (2**b) * 2 + (16 if qnorm_on(c) else 0)))


# --------------------------------------------------------------------------- KVQuant calibration


#: per-layer calibration keys, values, and their Fisher grads (None without ``fisher``)
KVRecording = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]

#: the last calibration recording, keyed by the exact model and calibration tokens: the K/V
#: activations and Fisher grads do not depend on bits or outliers, so the kvquant-4/3/2 cells of
#: one run (each on a fresh copy of the same model) record once.  One entry (~3 GB for
#: smollm2-135m at 16 x 2048 tokens with grads); ``clear_record_cache()`` frees it.
_RECORD_CACHE: dict[str, KVRecording] = {}


def clear_record_cache() -> None:
    _RECORD_CACHE.clear()


def cached_record_kv(
    model: nn.Module, calib: Calibration, fisher: bool, max_samples: int, sink: int
) -> tuple[KVRecording, bool]:
    """:func:`record_kv` and whether it was reused: the last recording, when model, tokens and settings match."""
    toks = calib.tokens[:max_samples].contiguous()
    key = "|".join([model_fingerprint(model), hashlib.blake2b(toks.cpu().numpy().tobytes(), digest_size=16).hexdigest(),
                    str(fisher), str(sink)])
    if key not in _RECORD_CACHE:
        _RECORD_CACHE.clear()
        _RECORD_CACHE[key] = record_kv(model, calib, fisher, max_samples, sink)
        return _RECORD_CACHE[key], False
    log.info("kvquant: calibration K/V%s reused from the previous cell", " and Fisher grads" if fisher else "")
    return _RECORD_CACHE[key], True


def record_kv(
    model: nn.Module, calib: Calibration, fisher: bool, max_samples: int, sink: int
) -> KVRecording:
    """Calibration K (pre-RoPE) and V activations [N, H, D] per layer and, with ``fisher``, their grads."""
    hd = head_dim_of(model)
    install(model, [(KVSpec(), KVSpec()) for _ in attention_modules(model)])
    wr = kv_wrappers(model)
    set_mode(model, "record")
    for k, v in wr:
        k.record_grad = v.record_grad = fisher
        k.recorded, v.recorded = [], []
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # packed weight kernels (e.g. int4pack) have no backward: the Fisher pass uses simulated weights
    packed = [(q, q.packed) for q in model.modules() if isinstance(q, QuantizedModule)]
    for q, _ in packed:
        q.packed = not fisher and q.packed
    dev = model_device(model)
    try:
        for ids in calib.tokens[:max_samples]:
            ids = ids.unsqueeze(0).to(dev)
            if not fisher:  # K/V are recorded in the blocks: no logits needed
                with torch.no_grad():
                    forward_for_hooks(model, ids)
                continue
            with torch.enable_grad():
                logits = model(ids).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                loss.backward()
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        for q, pk in packed:
            q.packed = pk
        set_mode(model, "qdq")

    def stack(ts: list[torch.Tensor], grad: bool) -> torch.Tensor:
        out = []
        for t in ts:
            x = cast(torch.Tensor, t.grad if grad else t).detach()[0, sink:]  # sink tokens are kept in fp16
            out.append(x.reshape(x.shape[0], -1, hd).float())
        return torch.cat(out)

    keys = [stack(k.recorded, False) for k, _ in wr]
    vals = [stack(v.recorded, False) for _, v in wr]
    kg = [stack(k.recorded, True) if fisher else None for k, _ in wr]
    vg = [stack(v.recorded, True) if fisher else None for _, v in wr]
    for k, v in wr:
        k.recorded, v.recorded = [], []
        k.record_grad = v.record_grad = False
    return keys, vals, kg, vg


def qnorm_on(c: KVQuantConfig) -> bool:
    """Q-Norm is on for 2 bits unless the config says otherwise (the paper's setting)."""
    return c.bits == 2 if c.qnorm is None else c.qnorm


def _fit_centroids(
    xn: torch.Tensor, w: torch.Tensor | None, c: KVQuantConfig, qn: bool
) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """Sensitivity-weighted k-means centroids and, with Q-Norm, the reconstruction's (scale, offset)."""
    n = xn.numel()
    if n > KMEANS_MAX_POINTS:  # seeded random subsample (a fixed stride would skip whole channels)
        idx = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(0), device="cpu")[:KMEANS_MAX_POINTS]
        idx = idx.to(xn.device)  # drawn on the CPU: the same subsample on every device
        xn, w = xn[idx], None if w is None else w[idx]
    cent = weighted_kmeans_1d(xn, w, 2**c.bits, c.kmeans_iters)
    return cent, (q_norm(cent, xn) if qn else None)


def key_thresholds(k: torch.Tensor, outlier_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel lower/upper outlier thresholds of calibration keys k [N, H, D], as fp16.

    The paper's per-vector dense-and-sparse thresholds: the ``outlier_frac / 2`` and
    ``1 - outlier_frac / 2`` quantiles of each channel (``round(outlier_frac / 2 * N)`` values in
    each tail are outliers).  The thresholds are also the channel's normalization range, so every
    inlier normalizes into [-1, 1] (a magnitude threshold with the inliers' min/max as the range
    leaves values in [-thresh, min) unclipped-but-out-of-range at evaluation time).
    """
    N = k.shape[0]
    n_t = int(round(outlier_frac / 2 * N))
    if n_t > 0:
        lo, hi = k.kthvalue(n_t + 1, dim=0).values, k.kthvalue(N - n_t, dim=0).values
    else:
        lo, hi = k.amin(0), k.amax(0)
    return lo.half(), hi.half()


def calibrate_keys(k: torch.Tensor, g: torch.Tensor | None, c: KVQuantConfig, qn: bool) -> KVSpec:
    """Per channel: lower/upper thresholds calibrated offline (= the range), NUQ centroids on inliers."""
    lo, hi = key_thresholds(k, c.outlier_frac)
    lf, hf = lo.float(), hi.float()
    inl = (k >= lf) & (k <= hf)
    xn = (k - (hf + lf) / 2) / ((hf - lf) / 2).clamp_min(1e-6)
    w = None if g is None else (g**2)[inl]
    cent, qnp = _fit_centroids(xn[inl], w, c, qn)
    return KVSpec("nuq", "channel", c.bits, outlier_frac=c.outlier_frac, sink=c.sink, centroids=cent, lo=lo, hi=hi,
                  qnorm=qnp)


def calibrate_values(v: torch.Tensor, g: torch.Tensor | None, c: KVQuantConfig, qn: bool) -> KVSpec:
    """Values are normalized per token online; the centroids are fitted on normalized calibration tokens."""
    x = v.permute(1, 0, 2).unsqueeze(0)  # [1, H, N, D], the cache layout
    mask = value_outlier_mask(x, c.outlier_frac)
    lo, hi = (t.float() for t in token_range(x, mask))
    xn = ((x - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-6))[0].permute(1, 0, 2)
    mask = mask[0].permute(1, 0, 2)
    w = None if g is None else (g**2)[~mask]
    cent, qnp = _fit_centroids(xn[~mask], w, c, qn)
    return KVSpec("nuq", "token", c.bits, outlier_frac=c.outlier_frac, sink=c.sink, centroids=cent, qnorm=qnp)


# --------------------------------------------------------------------------- real cache + generation


def make_cache(model: nn.Module) -> Any:
    """A real quantized cache for ``model`` (quantized by one of the KV methods here; else fp16)."""
    specs = model_specs(model)
    if not specs:
        install(model, [(KVSpec(), KVSpec()) for _ in attention_modules(model)])
        specs = model_specs(model)
    caps = [k for k, _ in kv_wrappers(model)]
    return QuantizedKVCache(specs, rotary=layer_rotaries(model), captures=caps)


def layer_rotaries(model: nn.Module) -> Any:
    """The model's rotary embedding (None without one), or, where it takes a layer type (Gemma 3: local RoPE
    on sliding layers, global on full ones), one callable per attention layer."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return rotary
    by_type = {t: functools.partial(rotary, layer_type=t) for t in {a.layer_type for a in attention_modules(model)}}
    return [by_type[a.layer_type] for a in attention_modules(model)]


def generate_with_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    n_new: int,
    cache: Any,
    timings: list[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> torch.Tensor:
    """:func:`~quantbench.methods.timing.greedy_decode` through ``cache`` with the wrappers capturing
    pre-RoPE keys for it; each step's seconds appended to ``timings``.

    With a :class:`~quantbench.kernels.kvcache.QuantizedKVCache` on an SDPA model, the one-token
    decode steps attend on the packed store (:func:`~quantbench.kernels.kvcache.decode_attention`: on
    CPU the fused C++ kernel :func:`~quantbench.kernels.kvcache.cpu_decode_attention`, else
    :func:`~quantbench.kernels.kvcache.packed_decode_attention`; the model's attention implementation
    is switched to it for the call; prefill still runs SDPA).  The CPU kernel is built or loaded
    before the first step, so no timed step includes it.  ``clock``: as greedy_decode's."""
    cfg = getattr(model, "config", None)
    attn = getattr(cfg, "_attn_implementation", None)
    packed = hasattr(cache, "set_packed_decode") and attn == "sdpa"
    set_mode(model, "capture")
    if packed:
        if input_ids.device.type == "cpu":
            load_cpu_decode_kernel()
        cfg._attn_implementation = register_packed_attention()  # type: ignore[union-attr]
        cache.set_packed_decode(True)
    try:
        return greedy_decode(model, input_ids, n_new, cache, timings, clock=clock)
    finally:
        set_mode(model, "qdq")
        if packed:
            cache.set_packed_decode(False)
            cfg._attn_implementation = attn  # type: ignore[union-attr]


def decode_ms_per_token(
    model: nn.Module,
    context: int,
    n_new: int = 8,
    quantized: bool = True,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """p50/p90 decode ms/token at ``context`` tokens (the KV decode benchmark, ``scripts/kv_decode_bench.py``):
    the quantized cache, or transformers' DynamicCache with the wrappers off (its bytes counted as fp16);
    timed by the one decode timer, :func:`~quantbench.methods.timing.greedy_decode` (``clock``: wall seconds, or
    ``time.thread_time`` for the CPU seconds of the calling thread, which other processes' load does not inflate)."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator("cpu").manual_seed(seed)
    ids = torch.randint(0, cast(Any, model.config).vocab_size, (1, context), generator=g,  # transformers config
                        device="cpu").to(model_device(model))
    times: list[float] = []
    if quantized:
        cache = make_cache(model)
        generate_with_cache(model, ids, n_new, cache, times, clock=clock)
        nb = cache.kv_bytes()
    else:
        set_mode(model, "off")
        try:
            cache = DynamicCache()
            greedy_decode(model, ids, n_new, cache, times, clock=clock)
            # DynamicLayers, filled by the decode (transformers types their keys/values as optional)
            nb = {"total": sum(t.numel() * 2 for lay in cast(Any, cache.layers) for t in (lay.keys, lay.values))}
        finally:
            set_mode(model, "qdq")
    ts = sorted(times[1:] or times)
    return {
        "p50_ms": 1000 * ts[len(ts) // 2],
        "p90_ms": 1000 * ts[min(len(ts) - 1, int(0.9 * len(ts)))],
        "context": context,
        "kv_bytes": nb,
        "protocol": PROTOCOL_CACHE,
    }
