"""BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs") and BitNet (Wang et al., 2023): BitLinear.

Weights (b1.58): W~ = RoundClip(W / (gamma + eps), -1, 1) with gamma = mean|W| (per tensor; per-channel
and per-group options).  Weights (BitNet, 1 bit): W~ = Sign(W - alpha), alpha = mean(W), scale
beta = mean|W| (``centralize=False`` gives plain sign(W)).  Activations: int8 per token, absmax scaling
Q_b = 127 / max|x|.  Training uses the straight-through estimator (STE).

The input of every BitLinear is normalized before the activation quantizer (both papers: BitLinear
computes W~ Quant(LN(x)); BitNet uses LayerNorm, b1.58 LLaMA-style RMSNorm -- the b1.58 training-tips
code calls ``RMSNorm(x)`` inside ``BitLinear.forward``).  ``bitnet-qat`` carries this norm (``norm``:
``"rms"`` by default, ``"layer"``, or ``"none"`` for the former norm-free layer) with a learnable
per-channel gain, trained with the weights and stored (fp32) in the packed module.  The papers train from
scratch, where the gain starts at 1; from a pretrained model a gain of 1 would rescale every layer's
output (o_proj / down_proj inputs are not normalized in a pretrained LLaMA), so the gain starts at its
least-squares fit to the layer's calibration inputs, g_c = E[n_c x_c] / E[n_c^2] with n = norm(x) --
the norm then replaces only the per-token scale, which is what the papers' BitLinear discards.  The
model's own block norms stay as they are (they are not quantized).  The PTQ methods have no norm (no
training to absorb it).

Methods:
- ``bitnet-ptq``: ternarize a pretrained model post hoc (no training; the paper trains from scratch,
  so expect a collapse — that is the result to show).
- ``bitnet-1bit``: the same with the 1-bit sign quantizer.
- ``bitnet-qat``: quantization-aware training from the pretrained weights on the calibration tokens
  (STE, warm-up lambda = min(step / warmup, 1) blending fp and quantized weights and activations,
  AdamW), checkpointed and resumable, then converted to the packed inference module.  Checkpoints are
  safetensors + JSON (never pickle), resumed only when their JSON matches the run's config.
  ``bits: 1bit`` trains BitNet's sign quantizer instead of the ternary one (per-tensor beta).
  ``distill: true`` replaces the next-token loss by knowledge distillation from the unquantized model
  (a frozen copy taken before the BitLinears go in): KL(p_fp || p_student) per token, temperature 1,
  averaged over the batch's tokens (:func:`distill_loss`).  From scratch (the papers' setting):
  ``warmup: 0`` (quantized from step 0), ``norm_init: ones`` (gains start at 1, as the papers'
  RMSNorm does; "fit" is for pretrained weights) and ``train: all`` (embeddings and the model's norms
  train too, in fp; the default trains only the BitLinears).
- ``fp-train``: the same training loop (:class:`_Trainer`: batches, AdamW, constant lr, checkpoints,
  ``loss_curve``) with no quantizer -- the fp side of a from-scratch pair.

Default QAT budget (sized from a measured step on smollm2-135m, 2 threads): see ``BitNetQATConfig``.

Measured on smollm2-135m (QAT's first batch, 2 x 256 wiki calibration tokens, no training; a one-off
script building BitLinears with ``BitNetQAT._init_norm_gains``, 2026-11-29): cross-entropy fp 2.47; no
norm 2.47 at lambda 0 and 17.78 at lambda 1; rms norm 5.41 at lambda 0 and 16.64 at lambda 1.  The norm
alone costs ~2.9 nats on a pretrained model (its o_proj / down_proj inputs carry per-token scales), and
the former 12-step run's final loss (17.8) is the untrained ternary model's: the warm-up reaches it.
With the norm, default.yaml's row (steps 12, warmup 4, lr 2e-4, 4 x 256 tokens a step; a script calling
``build_method("bitnet-qat", {"steps": 12, "warmup": 4})`` on the suite's calibration) logged the loss
5.45, 5.20, 8.73, 13.38, 15.18 (lambda reaches 1), 13.72, 13.64, 12.95, 12.09, 11.71, 11.45, 10.57: it
climbs only while lambda ramps, then falls every step (wiki test ppl 32,882 on the first 2 of the suite's
8 windows; the published 74,399 is on 8).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..kernels import ternary as T
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    QuantizedModule,
    Storage,
    check_choice,
    iter_linears,
    register,
    set_module,
    tensor_bytes,
)
from .placement import model_device

log = logging.getLogger(__name__)

GRANULARITIES = ("tensor", "channel", "group")
EPS = 1e-5
NORMS = ("rms", "layer", "none")
NORM_EPS = 1e-5  # the b1.58 training-tips RMSNorm epsilon


# --------------------------------------------------------------------------- quantizers (the paper's math)


def absmean_scale(w: torch.Tensor, granularity: str = "tensor", group_size: int = 128) -> torch.Tensor:
    """gamma = mean|W| over the tensor ([1]), each output row ([out, 1]) or each group ([out, n_groups, 1])."""
    a = w.abs().float()
    if granularity == "tensor":
        return a.mean().reshape(1)
    if granularity == "channel":
        return a.mean(1, keepdim=True)
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_f}")
    return a.reshape(out_f, in_f // group_size, group_size).mean(-1, keepdim=True)


def _expand(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 3:  # per group
        return scale.expand(-1, -1, w.shape[1] // scale.shape[1]).reshape(w.shape)
    return scale


def ternary_codes(
    w: torch.Tensor, granularity: str = "tensor", group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoundClip(W / (gamma + eps), -1, 1): int8 codes [out, in] and gamma (per tensor/channel/group)."""
    gamma = absmean_scale(w, granularity, group_size)
    codes = (w.float() / (_expand(gamma, w) + EPS)).round().clamp(-1, 1).to(torch.int8)
    return codes, gamma


def binary_codes(w: torch.Tensor, centralize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet 1-bit: Sign(W - alpha) with alpha = mean(W) (sign(0) = +1) and beta = mean|W| ([1])."""
    wf = w.float()
    alpha = wf.mean() if centralize else wf.new_zeros(())
    codes = torch.where(wf - alpha >= 0, 1, -1).to(torch.int8)
    return codes, wf.abs().mean().reshape(1)


def weight_quant(w: torch.Tensor, bits: str, granularity: str, group_size: int) -> torch.Tensor:
    """Fake-quantized weight (codes * scale), no gradient handling."""
    if bits == "1bit":
        codes, s = binary_codes(w)
        return codes.to(w.dtype) * s.to(w.dtype)
    codes, s = ternary_codes(w, granularity, group_size)
    return codes.to(w.dtype) * _expand(s, w).to(w.dtype)


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantized activations: per-token absmax int8, returned in x's dtype."""
    xq, qb = T.act_quant_int8(x)
    return (xq.float() / qb).to(x.dtype)


def bitlinear_norm(x: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The BitLinear input norm over the last dim, times the gain ``weight`` (None: no gain).

    ``"rms"``: x / sqrt(mean(x^2) + eps) (b1.58); ``"layer"``: (x - mean) / sqrt(var + eps) (BitNet);
    ``"none"``: x unchanged.  Computed in fp32, returned in x's dtype.
    """
    if kind == "none":
        return x
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def norm_gain_sums(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_rows n * x, sum_rows n^2) per channel, n = norm(x), over the rows of ``x`` [..., k] (fp64)."""
    xf = x.reshape(-1, x.shape[-1]).double()
    n = bitlinear_norm(xf, kind)
    return (n * xf).sum(0), n.pow(2).sum(0)


def norm_gain_init(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """The least-squares per-channel gain g = sum(n x) / sum(n^2), minimising ||norm(x) * g - x||^2 (1 where
    a channel is always zero)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(num)).float()


# --------------------------------------------------------------------------- training module


class BitLinear(nn.Linear):
    """Training-time BitLinear: fp latent weights, quantized forward, STE backward.

    y = Q(W) Quant(norm(x) * g) (+ bias): the input norm (``norm``, learnable gain ``norm_weight``) comes
    first, then the per-token int8 activation quantizer.  ``lam`` (warm-up lambda) blends the
    quantizers: W_used = W + lam * (Q(W) - W).detach(), likewise for the normalized activations; lam = 1
    is the paper's BitLinear.  The norm is part of the layer, not of the quantization: it is never blended.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: str = "ternary",
                 granularity: str = "tensor", group_size: int = 128, act_bits: int | None = 8,
                 norm: str = "none", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.granularity, self.group_size, self.act_bits = bits, granularity, group_size, act_bits
        self.norm = norm
        self.norm_weight = None if norm == "none" else nn.Parameter(torch.ones(in_features, device=device))
        self.lam = 1.0

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw: Any) -> BitLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, **kw, device=lin.weight.device)
        m.to(lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w + self.lam * (weight_quant(w, self.bits, self.granularity, self.group_size) - w).detach()
        x = bitlinear_norm(x, self.norm, self.norm_weight)
        if self.act_bits == 8:
            x = x + self.lam * (act_quant(x) - x).detach()
        return F.linear(x, w, self.bias)


# --------------------------------------------------------------------------- packed inference module


class TernaryLinear(QuantizedModule):
    """Inference BitLinear over packed codes (2-bit, base-3 or 1-bit) and fp32 scales.

    Packed path: int8 activations x int8 codes through ``torch._int_mm`` (per-tensor / per-channel
    scales), or the fp dequantized weight for per-group scales.  Simulated path: F.linear over the
    dequantized weight with fake-quantized activations.  Both compute the same numbers up to fp rounding.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    norm_weight: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, fmt: str = "2bit", granularity: str = "tensor",
                 group_size: int = 128, act_bits: int | None = 8, bias: bool = False, norm: str = "none",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.granularity, self.group_size, self.act_bits = fmt, granularity, group_size, act_bits
        self.norm = norm  # BitLinear input norm applied before the activation quantizer ("none": none)
        self.register_buffer("norm_weight", None if norm == "none" else torch.ones(in_features, device=device))
        n_scales = {"tensor": (1,), "channel": (out_features,),
                    "group": (out_features, max(in_features // group_size, 1))}[granularity]
        self.register_buffer("qweight", torch.zeros(out_features, T.packed_cols(in_features, fmt),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(*n_scales, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.packed = True
        self.cache_codes = True
        self._codes_t: torch.Tensor | None = None
        if fmt == "2bit" and act_bits == 8 and granularity != "group" and torch.device(device or "cpu").type == "cpu":
            T.load_ternary_cpu_kernel()  # built here, not in a forward torch.compile may be tracing

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, fmt: str = "2bit", granularity: str = "tensor",
                   group_size: int = 128, act_bits: int | None = 8,
                   bias: torch.Tensor | None = None, norm: str = "none",
                   norm_weight: torch.Tensor | None = None) -> TernaryLinear:
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, fmt, granularity, group_size, act_bits, bias is not None, norm, device=codes.device)
        if m.norm_weight is not None and norm_weight is not None:
            m.norm_weight.copy_(norm_weight.float())
        m.qweight.copy_(T.pack_ternary(codes, fmt))
        m.scale.copy_(scale.float().reshape(m.scale.shape))
        if bias is not None:
            assert m.bias is not None  # built with a bias buffer
            m.bias.copy_(bias.float())
        return m

    def save_spec(self) -> dict[str, Any]:
        """The constructor's arguments (:class:`~quantbench.methods.base.Saveable`; used by ``qb.save``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "fmt": self.fmt,
                "granularity": self.granularity, "group_size": self.group_size, "act_bits": self.act_bits,
                "bias": self.bias is not None, "norm": self.norm}

    def codes(self) -> torch.Tensor:
        return T.unpack_ternary(self.qweight, self.in_features, self.fmt)

    def _scale_full(self) -> torch.Tensor:
        if self.granularity == "group":
            return self.scale.repeat_interleave(self.in_features // self.scale.shape[1], dim=1)
        return self.scale.view(-1, 1)

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes().float() * self._scale_full()

    def storage(self) -> Storage:
        return Storage(packed_weights=tensor_bytes(self.qweight), scales_zeros=tensor_bytes(self.scale),
                       unquantized=tensor_bytes(self.bias) + tensor_bytes(self.norm_weight),
                       quantized_weights=self.in_features * self.out_features)

    def _codes_transposed(self) -> torch.Tensor:
        if self._codes_t is not None and self._codes_t.device == self.qweight.device:
            return self._codes_t
        ct = self.codes().T.contiguous()
        if self.cache_codes:
            self._codes_t = ct
        return ct

    def _apply(self, fn: Any, recurse: bool = True) -> TernaryLinear:  # device/dtype moves drop the cache
        self._codes_t = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = bitlinear_norm(x, self.norm, self.norm_weight)
        if self.packed and self.granularity != "group" and x.device.type == "cpu":
            if self.fmt == "2bit" and self.act_bits == 8 and T.packed_gemv_applies(x):  # decode: the 2-bit codes
                return T.ternary_linear_2bit(x, self.qweight, self.scale.view(-1), self.bias)
            return T.ternary_linear(x, self._codes_transposed(), self.scale.view(-1), self.bias, self.act_bits)
        if self.packed and self.granularity != "group" and self.fmt == "2bit" and x.device.type == "cuda":
            from ..kernels.triton_ternary import triton_ternary_linear  # GPU: unpack inside the GEMM

            return triton_ternary_linear(x, self)
        xa = act_quant(x.float()) if self.act_bits == 8 else x.float()
        y = F.linear(xa, self.dequantized_weight(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        norm = "" if self.norm == "none" else f", norm={self.norm}"
        return (f"{self.in_features}, {self.out_features}, fmt={self.fmt}, scale={self.granularity}, "
                f"a{self.act_bits}{norm}")


def to_packed(lin: nn.Linear, bits: str, fmt: str, granularity: str, group_size: int,
              act_bits: int | None) -> TernaryLinear:
    """Quantize a (Bit)Linear's weight and pack it."""
    w = lin.weight.data
    if bits == "1bit":
        codes, s = binary_codes(w)
        fmt, granularity = "1bit", "tensor"
    else:
        codes, s = ternary_codes(w, granularity, group_size)
    bias = None if lin.bias is None else lin.bias.data
    norm = getattr(lin, "norm", "none")
    nw = getattr(lin, "norm_weight", None)
    return TernaryLinear.from_codes(codes, s, fmt, granularity, group_size, act_bits, bias, norm,
                                    None if nw is None else nw.data)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BitNetConfig(ModuleSelection):
    fmt: str = "2bit"  # packed storage: "2bit" (4 codes/byte) or "base3" (5 trits/byte, 1.6 bits)
    granularity: str = "tensor"  # gamma per "tensor" (paper), "channel" or "group"
    group_size: int = 128
    act_bits: int | None = 8  # 8: int8 per-token activations (paper); None: weight-only

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bitnet", "fmt", self.fmt, ("2bit", "base3"))
        check_choice("bitnet", "granularity", self.granularity, GRANULARITIES)
        check_choice("bitnet", "act_bits", self.act_bits, (8, None))
        if not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"bitnet: group_size must be in 1..{1 << 20}, got {self.group_size}")


@dataclass(frozen=True)
class BitNet1bitConfig(ModuleSelection):
    act_bits: int | None = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bitnet-1bit", "act_bits", self.act_bits, (8, None))


TRAIN_SETS = ("linears", "all")
NORM_INITS = ("fit", "ones")


def _check_train(name: str, c: Any) -> None:
    """The training budget fields shared by ``bitnet-qat`` and ``fp-train``."""
    for k in ("steps", "seq_len", "batch_size", "checkpoint_every"):
        if not 0 < getattr(c, k) <= 1_000_000:
            raise ConfigError(f"{name}: {k} must be in 1..1000000, got {getattr(c, k)}")
    warmup = getattr(c, "warmup", 0)
    if not 0 <= warmup <= 1_000_000 or not 0 < c.lr < 1:
        raise ConfigError(f"{name}: warmup must be in 0..1000000 and lr in (0, 1), got warmup {warmup}, lr {c.lr}")
    if not 0 <= c.weight_decay < 1:
        raise ConfigError(f"{name}: weight_decay must be in [0, 1), got {c.weight_decay}")
    check_choice(name, "train", c.train, TRAIN_SETS)


@dataclass(frozen=True)
class BitNetQATConfig(BitNetConfig):
    """QAT budget.  Default: 40 steps x batch 4 x seq_len 256 (41k tokens; the default suite's 32 x 512
    calibration tokens are cycled 2.5 times), warm-up 10 steps, AdamW lr 2e-4, a checkpoint every 10 steps.

    Sized from measured steps on smollm2-135m at 2 threads (all 210 linears as BitLinear, AdamW on their
    weights): a warm 4 x 256 step took 38.5 s of CPU time (116 s wall on the shared machine at load ~15),
    i.e. about 15-20 s of wall time at 2 threads on an idle 2-core CPU; 40 steps ~ 10-13 minutes.
    A 2 x 256 step cost about as much (the per-step work — weight quantization and AdamW over 106M
    latent weights — is not proportional to tokens), so the budget spends tokens per step, not steps.
    """

    steps: int = 40
    lr: float = 2e-4
    weight_decay: float = 0.0
    seq_len: int = 256
    batch_size: int = 4
    warmup: int = 10
    checkpoint_every: int = 10
    norm: str = "rms"  # BitLinear input norm: "rms" (b1.58), "layer" (BitNet), "none" (no norm)
    norm_init_rows: int = 8  # calibration rows (of seq_len tokens) for the norm gains' least-squares init
    bits: str = "ternary"  # "ternary" (b1.58, RoundClip(W / gamma)) or "1bit" (BitNet, Sign(W - alpha) * beta)
    distill: bool = False  # loss = KL(teacher || student) per token on the unquantized model's logits (T = 1)
    train: str = "linears"  # what AdamW trains: the BitLinears ("linears") or every parameter ("all", from scratch)
    norm_init: str = "fit"  # BitLinear norm gains: least-squares "fit" (pretrained) or "ones" (from scratch)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bitnet-qat", "norm", self.norm, NORMS)
        check_choice("bitnet-qat", "bits", self.bits, ("ternary", "1bit"))
        check_choice("bitnet-qat", "norm_init", self.norm_init, NORM_INITS)
        if not 0 < self.norm_init_rows <= 1_000_000:
            raise ConfigError(f"bitnet-qat: norm_init_rows must be in 1..1000000, got {self.norm_init_rows}")
        if self.bits == "1bit" and self.granularity != "tensor":
            raise ConfigError("bitnet-qat: bits '1bit' has one scale per tensor (BitNet's beta); "
                              f"granularity must be 'tensor', got {self.granularity!r}")
        _check_train("bitnet-qat", self)


@dataclass(frozen=True)
class FPTrainConfig(ModuleSelection):
    """``fp-train``: bitnet-qat's training loop (same batches, AdamW, constant lr, checkpoints, loss curve) with
    no quantizer: the fp side of a from-scratch pair."""

    steps: int = 40
    lr: float = 2e-4
    weight_decay: float = 0.0
    seq_len: int = 256
    batch_size: int = 4
    checkpoint_every: int = 10
    train: str = "linears"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_train("fp-train", self)


# --------------------------------------------------------------------------- methods


def _pack_model(model: nn.Module, c: BitNetConfig | BitNet1bitConfig, bits: str) -> int:
    layers = list(iter_linears(model, c.include, c.exclude))
    fmt = getattr(c, "fmt", "1bit")
    gran, gs = getattr(c, "granularity", "tensor"), getattr(c, "group_size", 128)
    for name, lin in tqdm(layers, desc=f"bitnet-{bits}", leave=False, disable=None):
        set_module(model, name, to_packed(lin, bits, fmt, gran, gs, c.act_bits))
    return len(layers)


@register
class BitNetPTQ(Method):
    name = "bitnet-ptq"
    config_cls = BitNetConfig
    target = "weights+activations"

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        self.artifacts["quantized_modules"] = _pack_model(model, self.config, "ternary")  # type: ignore[arg-type]
        return model


@register
class BitNet1bit(Method):
    name = "bitnet-1bit"
    config_cls = BitNet1bitConfig
    target = "weights+activations"

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        self.artifacts["quantized_modules"] = _pack_model(model, self.config, "1bit")  # type: ignore[arg-type]
        return model


def qat_batch(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Batch ``step``: rows of ``seq_len`` tokens cut from the calibration tokens, cycled deterministically."""
    flat = tokens.reshape(-1)
    n_rows = flat.numel() // seq_len
    if n_rows == 0:
        raise ValueError(f"calibration has {flat.numel()} tokens, fewer than seq_len={seq_len}")
    rows = flat[: n_rows * seq_len].view(n_rows, seq_len)
    idx = torch.arange(step * batch_size, (step + 1) * batch_size, device=flat.device) % n_rows
    return rows[idx]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, temperature 1, averaged over tokens:
    mean_t sum_v p_t(v) (log p_t(v) - log p_s(v)), computed in fp32 (every position of the batch)."""
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, v).float(), -1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, v).float(), -1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


class _Trainer(Method):
    """The training loop shared by ``bitnet-qat`` and ``fp-train``: AdamW at a constant lr on batches
    :func:`qat_batch` cuts from the calibration tokens, next-token cross-entropy (or :func:`distill_loss`
    against a frozen teacher), safetensors + JSON checkpoints every ``checkpoint_every`` steps, resumed when
    their config matches, and the ``loss_curve`` artifact ([step, loss] per step)."""

    needs_calibration = True

    def _train(self, model: nn.Module, modules: dict[str, nn.Module], tokens: torch.Tensor,
               on_step: Any = None, teacher: nn.Module | None = None) -> list[list[float]]:
        """Train the parameters of ``modules`` (checkpointed by name) in ``model``; returns the loss curve.
        ``on_step(step)`` runs before each step (bitnet-qat sets lambda there)."""
        c = self.config
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(dict.fromkeys(p for m in modules.values() for p in m.parameters()))  # tied: once
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)  # type: ignore[attr-defined]
        curve: list[list[float]] = []
        start = 0
        resumed = self._resume(modules, opt)  # the latest checkpoint whose JSON matches (never unpickles)
        if resumed is not None:
            start, curve = resumed
        steps, bs, seq_len = c.steps, c.batch_size, c.seq_len  # type: ignore[attr-defined]
        dev = model_device(model)  # batches are cut from the (CPU) calibration tokens
        was_training = model.training
        model.train()
        bar = tqdm(range(start, steps), desc=self.name, leave=False, initial=start, total=steps, disable=None)
        for step in bar:
            if on_step is not None:
                on_step(step)
            ids = qat_batch(tokens, step, bs, seq_len).to(dev)
            logits = model(input_ids=ids).logits
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                loss = distill_loss(logits, t_logits)
            else:
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append([step + 1, float(loss.item())])
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            if not math.isfinite(curve[-1][1]):
                raise FloatingPointError(f"{self.name}: loss is {curve[-1][1]} at step {step + 1}")
            if self.artifact_dir is not None and ((step + 1) % c.checkpoint_every == 0  # type: ignore[attr-defined]
                                                  or step + 1 == steps):
                self._save(step + 1, modules, opt, curve)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(False)
        self.artifacts["loss_curve"] = curve
        self.artifacts["loss"] = "kl_to_fp_logits" if teacher is not None else "cross_entropy"
        if self.artifact_dir is not None:
            Path(self.artifact_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.artifact_dir) / "loss_curve.json").write_text(json.dumps(curve))
        return curve

    def _checkpoints(self) -> list[QATCheckpoint]:
        return qat_checkpoints(self.artifact_dir) if self.artifact_dir is not None else []

    def _resume(self, modules: dict[str, nn.Module],
                opt: torch.optim.Optimizer) -> tuple[int, list[list[float]]] | None:
        """Load the latest checkpoint into ``modules`` and ``opt`` and restore the RNG: (step, loss curve),
        or None (no checkpoint, or one that does not match this run: ignored with a warning)."""
        if self.artifact_dir is None:
            return None
        legacy = sorted(p.name for p in Path(self.artifact_dir).glob("qat_step*.pt"))
        if legacy:
            log.warning("%s: ignoring %s in %s: pickle checkpoints are never loaded (QAT checkpoints "
                        "are safetensors + JSON)", self.name, ", ".join(legacy), self.artifact_dir)
        ckpts = self._checkpoints()
        if not ckpts:
            return None
        ck = ckpts[-1]
        try:
            step, curve = load_qat_checkpoint(ck, self.config.to_dict(), modules, opt)
        except CheckpointMismatch as e:
            log.warning("%s: checkpoint %s ignored (%s); starting over", self.name, ck.meta, e)
            return None
        log.info("%s: resumed from %s (step %d)", self.name, ck.meta, step)
        return step, curve

    def _save(self, step: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
              curve: list[list[float]]) -> None:
        ck = save_qat_checkpoint(Path(self.artifact_dir), step, self.config.to_dict(),  # type: ignore[arg-type]
                                 modules, opt, curve)
        for old in self._checkpoints():  # keep only the latest (a checkpoint holds weights + AdamW state)
            if old.step != ck.step:
                old.meta.unlink()
                old.tensors.unlink(missing_ok=True)


@register
class BitNetQAT(_Trainer):
    name = "bitnet-qat"
    config_cls = BitNetQATConfig
    target = "weights+activations"

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: BitNetQATConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ValueError("bitnet-qat needs calibration tokens")
        teacher = None
        if c.distill:  # the unquantized model, frozen
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        # 1. replace the linears by training BitLinears (fp latent weights)
        names = [n for n, _ in iter_linears(model, c.include, c.exclude)]
        bitlins: dict[str, BitLinear] = {}
        for name in names:
            bl = BitLinear.from_linear(cast(nn.Linear, model.get_submodule(name)), bits=c.bits,
                                       granularity=c.granularity, group_size=c.group_size, act_bits=c.act_bits,
                                       norm=c.norm)
            set_module(model, name, bl)
            bitlins[name] = bl
        if c.norm != "none" and c.norm_init == "fit":
            self._init_norm_gains(model, bitlins, calib.tokens, c)

        # 2. train (resuming a matching checkpoint): STE through BitLinear, warm-up lambda = min(step / warmup, 1)
        def set_lambda(step: int) -> None:
            lam = min(step / c.warmup, 1.0) if c.warmup > 0 else 1.0
            for bl in bitlins.values():
                bl.lam = lam

        modules: dict[str, nn.Module] = {"model": model} if c.train == "all" else dict(bitlins)
        self._train(model, modules, calib.tokens, set_lambda, teacher)
        del teacher
        # 3. convert to the packed inference module (lambda = 1 quantizer on the trained latent weights)
        for name, bl in bitlins.items():
            set_module(model, name, to_packed(bl, c.bits, c.fmt, c.granularity, c.group_size, c.act_bits))
        self.artifacts["quantized_modules"] = len(bitlins)
        return model

    @staticmethod
    @torch.no_grad()
    def _init_norm_gains(model: nn.Module, bitlins: dict[str, BitLinear], tokens: torch.Tensor,
                         c: BitNetQATConfig) -> None:
        """Each BitLinear's norm gain := the least-squares fit of norm(x) * g to its input x (fp model,
        the first ``norm_init_rows`` rows of ``seq_len`` calibration tokens), so the pretrained scale is kept."""
        sums: dict[str, list[torch.Tensor]] = {}
        kinds = {n: bl.norm for n, bl in bitlins.items()}

        def hook(n: str, x: torch.Tensor) -> None:
            num, den = norm_gain_sums(x.detach(), kinds[n])
            if n in sums:
                sums[n][0] += num
                sums[n][1] += den
            else:
                sums[n] = [num, den]

        handles = []
        for n, bl in bitlins.items():
            bl.lam, bl.norm = 0.0, "none"  # the fp layer: every linear sees the pretrained model's input
            handles.append(bl.register_forward_pre_hook(lambda _m, args, n=n: hook(n, args[0])))
        dev = model_device(model)
        was_training = model.training
        model.eval()
        try:
            rows = qat_batch(tokens, 0, c.norm_init_rows, c.seq_len)
            for i in range(0, rows.shape[0], c.batch_size):
                model(input_ids=rows[i : i + c.batch_size].to(dev))
        finally:
            for h in handles:
                h.remove()
            for n, bl in bitlins.items():
                bl.norm = kinds[n]
            model.train(was_training)
        for n, bl in bitlins.items():
            assert bl.norm_weight is not None
            bl.norm_weight.copy_(norm_gain_init(*sums[n]))
        log.info("bitnet-qat: %s norm gains fitted on %d x %d calibration tokens", c.norm, rows.shape[0], c.seq_len)


@register
class FPTrain(_Trainer):
    """``fp-train``: train the model in floating point with bitnet-qat's loop (no quantizer): the fp
    reference of a from-scratch pair (``train: all`` trains embeddings and norms too)."""

    name = "fp-train"
    config_cls = FPTrainConfig

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: FPTrainConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ValueError("fp-train needs calibration tokens")
        modules: dict[str, nn.Module] = ({"model": model} if c.train == "all" else
                                         {n: m for n, m in iter_linears(model, c.include, c.exclude)})
        self._train(model, modules, calib.tokens)
        return model


# --------------------------------------------------------------------------- QAT checkpoints (no pickle)
#
# A checkpoint is two files in the method's artifact directory: ``qat_step<N>.safetensors`` (the BitLinears'
# latent weights and the optimizer's tensor state) and ``qat_step<N>.json`` (step, loss curve, config, RNG
# state as lists, the optimizer's scalar state and hyperparameters, the tensor names).  Neither format can
# run code when read.  A checkpoint is resumed only when its JSON matches the current run exactly.

CHECKPOINT_FORMAT = 1
_CKPT_NAME = re.compile(r"qat_step([0-9]{1,9})\.json")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run (other config, model or format) or cannot be read."""


@dataclass(frozen=True)
class QATCheckpoint:
    step: int
    meta: Path  # qat_step<N>.json
    tensors: Path  # qat_step<N>.safetensors


def _plain(x: Any) -> Any:
    """``x`` as JSON reads it back (tuples become lists), for comparing a stored value with a live one."""
    return json.loads(json.dumps(x))


def _own_file(p: Path, root: Path) -> bool:
    """A regular file (not a link) directly inside ``root``."""
    return p.is_file() and not p.is_symlink() and p.resolve().parent == root


def qat_checkpoints(directory: str | Path) -> list[QATCheckpoint]:
    """The complete checkpoints (both files, regular files inside ``directory``), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    root = d.resolve()
    found = []
    for meta in d.glob("qat_step*.json"):
        m = _CKPT_NAME.fullmatch(meta.name)
        tensors = meta.with_suffix(".safetensors")
        if m and _own_file(meta, root) and _own_file(tensors, root):
            found.append(QATCheckpoint(int(m.group(1)), meta, tensors))
    return sorted(found, key=lambda c: c.step)


def _rng_state() -> dict[str, Any]:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return {"torch": torch.get_rng_state().tolist(), "cuda": cuda}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


def save_qat_checkpoint(directory: Path, step: int, config: dict[str, Any], bitlins: dict[str, nn.Module],
                        opt: torch.optim.Optimizer, curve: list[list[float]]) -> QATCheckpoint:
    """Write ``qat_step<step>.safetensors`` then ``qat_step<step>.json`` (each through a temporary file,
    the JSON last: a checkpoint whose JSON exists is complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    linear_keys: list[list[str]] = []
    for i, bl in enumerate(bitlins.values()):
        sd = bl.state_dict()
        linear_keys.append(list(sd))
        for k, v in sd.items():
            tensors[f"linear.{i}.{k}"] = v.detach().cpu().clone().contiguous()  # a copy: tied weights share one
    osd = opt.state_dict()
    opt_tensors: dict[str, list[str]] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                opt_tensors.setdefault(str(idx), []).append(k)
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    meta = {
        "format": CHECKPOINT_FORMAT, "step": step, "config": config, "loss_curve": curve,
        "linears": list(bitlins), "linear_keys": linear_keys,
        "optimizer": {"tensors": opt_tensors, "scalars": opt_scalars, "param_groups": osd["param_groups"]},
        "rng": _rng_state(),
    }
    ck = QATCheckpoint(step, directory / f"qat_step{step}.json", directory / f"qat_step{step}.safetensors")
    tmp_t, tmp_m = ck.tensors.with_suffix(".safetensors.tmp"), ck.meta.with_suffix(".json.tmp")
    save_file(tensors, str(tmp_t))
    tmp_t.replace(ck.tensors)
    tmp_m.write_text(json.dumps(meta))
    tmp_m.replace(ck.meta)
    return ck


def load_qat_checkpoint(ck: QATCheckpoint, config: dict[str, Any], bitlins: dict[str, nn.Module],
                        opt: torch.optim.Optimizer) -> tuple[int, list[list[float]]]:
    """Check ``ck`` against this run (format, step, config, linears and their shapes, optimizer groups),
    then load it into ``bitlins`` and ``opt`` and restore the RNG state: (step, loss curve).

    Raises :class:`CheckpointMismatch` (nothing loaded) when it does not match or cannot be read.
    Reads JSON and safetensors only: nothing in either file can run code.
    """
    try:
        meta = json.loads(ck.meta.read_text())
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"not a format-{CHECKPOINT_FORMAT} QAT checkpoint")
        if meta.get("config") != _plain(config):
            raise CheckpointMismatch("different config")
        step, curve = meta["step"], meta["loss_curve"]
        if step != ck.step or not isinstance(curve, list) or len(curve) != step:
            raise CheckpointMismatch("step and loss curve do not match the file name")
        if meta["linears"] != list(bitlins):
            raise CheckpointMismatch("different linears (another model?)")
        osd = opt.state_dict()
        om = meta["optimizer"]
        if om["param_groups"] != _plain(osd["param_groups"]):
            raise CheckpointMismatch("different optimizer settings")
        tensors = load_file(str(ck.tensors), device="cpu")
        linear_sds = []
        for i, (name, bl) in enumerate(bitlins.items()):
            want = bl.state_dict()
            if meta["linear_keys"][i] != list(want):
                raise CheckpointMismatch(f"{name}: different tensors")
            sd = {k: tensors[f"linear.{i}.{k}"] for k in want}
            for k, v in sd.items():
                if v.shape != want[k].shape or v.dtype != want[k].dtype:
                    raise CheckpointMismatch(f"{name}.{k}: {tuple(v.shape)} {v.dtype}, expected "
                                             f"{tuple(want[k].shape)} {want[k].dtype}")
            linear_sds.append(sd)
        params = [p for g in opt.param_groups for p in g["params"]]
        state: dict[int, dict[str, Any]] = {}
        for idx in sorted({*om["tensors"], *om["scalars"]}, key=int):
            i = int(idx)
            if not 0 <= i < len(params):
                raise CheckpointMismatch(f"optimizer state for parameter {i} of {len(params)}")
            st: dict[str, Any] = dict(om["scalars"].get(idx, {}))
            for k in om["tensors"].get(idx, []):
                v = tensors[f"optimizer.{idx}.{k}"]
                if v.dim() > 0 and v.shape != params[i].shape:
                    raise CheckpointMismatch(f"optimizer {k} of parameter {i}: shape {tuple(v.shape)}")
                st[k] = v
            state[i] = st
        rng = meta["rng"]
        rng_state = torch.tensor(rng["torch"], dtype=torch.uint8)
        if rng_state.shape != torch.get_rng_state().shape:
            raise CheckpointMismatch("RNG state of another size")
    except CheckpointMismatch:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError,
            SafetensorError) as e:
        raise CheckpointMismatch(f"unreadable: {type(e).__name__}: {str(e)[:200]}") from e
    # everything checked: load (nothing above touched the model, the optimizer or the RNG)
    for bl, sd in zip(bitlins.values(), linear_sds):
        bl.load_state_dict(sd)
    opt.load_state_dict({"state": state, "param_groups": osd["param_groups"]})
    _set_rng_state(rng)
    return step, curve


# --------------------------------------------------------------------------- native BitNet checkpoints


def load_bitnet_checkpoint(path: str | Path, fmt: str = "2bit", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a native BitNet b1.58 checkpoint (transformers' ``bitnet`` architecture) from a local HF directory
    and replace its linears by :class:`TernaryLinear` (packed codes, int8 activations).

    Works for checkpoints with dense (latent or already-ternary) weights and for packed ones that
    transformers loads into its own ``BitLinear`` (uint8 weights, ``weight_scale`` = 1 / gamma).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    n = 0
    for name, mod in list(model.named_modules()):
        if "lm_head" in name or "embed" in name:
            continue
        if type(mod).__name__ == "BitLinear" and hasattr(mod, "weight_scale") and mod.weight.dtype == torch.uint8:
            from transformers.integrations.bitnet import unpack_weights

            codes = unpack_weights(mod.weight, torch.float32).round().to(torch.int8)
            gamma = 1.0 / mod.weight_scale.float().reshape(1)
            bias = getattr(mod, "bias", None)
            new = TernaryLinear.from_codes(codes, gamma, fmt, bias=None if bias is None else bias.data)
        elif isinstance(mod, nn.Linear):
            new = to_packed(mod, "ternary", fmt, "tensor", 128, 8)
        else:
            continue
        set_module(model, name, new)
        n += 1
    log.info("load_bitnet_checkpoint: %d linears packed (%s)", n, fmt)
    return model
