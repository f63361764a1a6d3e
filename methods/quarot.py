"""QuaRot (Ashkboos et al., 2024, arXiv:2404.00456): outlier-free W4A4 (+KV4) through Hadamard rotations,
and ``w4a4``, the same quantizers without any rotation (the naive baseline).

QuaRot, as the paper and its reference (``fake_quant``) run it on a llama-style model:

1. **Norm folding**: each RMSNorm's weight is folded into the linears that read it (q/k/v,
   gate/up; the final norm into lm_head, which is untied from the embedding first), leaving pure
   RMSNorms (weight 1), which commute with an orthogonal rotation of the residual stream.
2. **Residual rotation** by a randomized Hadamard ``Q = (H / sqrt(d)) diag(s)`` (seeded signs;
   hidden 576 = 36 x 16 uses a Paley-II order-36 matrix (x) Sylvester 16,
   :mod:`quantbench.kernels.hadamard`): embedding ``E Q``, linears reading the residual ``W Q``,
   linears writing it (o_proj, down_proj) ``Q^T W``, lm_head ``W Q``.  The function is unchanged.
3. **Online Hadamards**: the input of down_proj is transformed at run time by ``H_1536``
   (1536 = 12 x 128) with down_proj's weight absorbing it offline; values are rotated per head
   (v_proj's output, ``H_head_dim``, folded offline) and the attention output gets the online
   Hadamard across heads before o_proj (o_proj absorbing ``H_heads (x) H_head_dim``); queries and keys
   get an online ``H_head_dim`` after RoPE, so the KV cache holds rotated keys (q . k unchanged).
4. **Quantization**: weights symmetric per output channel (``w_bits``; RTN with the reference's
   ``--w_clip`` range search, or GPTQ through :class:`quantbench.methods.gptq.GPTQ` on the rotated
   model, act-order off as in the reference); the inputs of every linear of the blocks symmetric per
   token, dynamic (``a_bits``, clip ratio ``a_clip_ratio``); K (after RoPE and the Hadamard) and V
   asymmetric per head (group = head_dim, ``kv_bits``, clip ratio ``kv_clip_ratio``).  Embedding and
   lm_head stay unquantized.  Defaults: the paper's W4A4KV4 setting, activation clip 0.9, KV clip 0.95.

Deviations: a model whose head count has no Hadamard matrix (SmolLM2: 9 heads) gets a full-width
online Hadamard of order ``heads x head_dim`` before o_proj instead of the across-heads one (o_proj
absorbs the product with the per-head value rotation; still an exact rotation).  The GPTQ path uses the
GPTQ solver's symmetric grid (``scale = 2 max|w| / 15``, codes -8..7) with the same range search; RTN
uses QuaRot's own (``scale = max|w| / 7``).  Scales are stored in fp16.

Execution: :class:`W4A4Linear` stores the 4-bit codes two per byte with an fp16 scale per output
channel and multiplies int4 activation codes by int4 weight codes in int32
(:func:`quantbench.kernels.w4a4.w4a4_matmul`, ``torch._int_mm``), rescaling once.  The evaluation
path quantize-dequantizes K and V in the attention; the real cache (:meth:`QuaRot.make_cache`) stores
the same values as packed int codes with fp16 scale and zero per head and token.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int8mm
from ..kernels.hadamard import hadamard_exists, hadamard_factors, hadamard_transform, random_hadamard_matrix
from ..kernels.kvcache import KVSpec, QuantizedKVCache
from ..kernels.w4a4 import (
    fake_quantize_asym,
    fake_quantize_sym,
    pack_int4,
    quantize_per_token_sym,
    sym_codes,
    unpack_int4,
    w4a4_matmul,
    weight_scale_sym,
)
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
from .gptq import GPTQ, GPTQConfig
from .kvcalc import cache_bytes, fp16_cache_bytes
from .qlinear import IntQuantLinear

log = logging.getLogger(__name__)

READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES_RESIDUAL = ("o_proj", "down_proj")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class W4A4Config(ModuleSelection):
    weights: str = "rtn"  # rtn | gptq
    w_bits: int = 4  # 16: weights left in float
    a_bits: int = 4  # 16: activations left in float
    kv_bits: int = 16  # 16: KV cache left in float
    w_clip: bool = True  # the reference's --w_clip range search (RTN and GPTQ grids)
    a_clip_ratio: float = 0.9
    kv_clip_ratio: float = 0.95
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self._name(), "weights", self.weights, ("rtn", "gptq"))
        check_choice(self._name(), "w_bits", self.w_bits, (4, 8, 16))
        check_choice(self._name(), "a_bits", self.a_bits, (4, 8, 16))
        check_choice(self._name(), "kv_bits", self.kv_bits, (2, 4, 8, 16))
        for k in ("a_clip_ratio", "kv_clip_ratio"):
            if not 0.0 < float(getattr(self, k)) <= 1.0:
                raise ConfigError(f"{self._name()}: {k} must be in (0, 1], got {getattr(self, k)}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"{self._name()}: percdamp must be in [0, 1), got {self.percdamp}")

    def _name(self) -> str:
        return "w4a4"


@dataclass(frozen=True)
class QuaRotConfig(W4A4Config):
    kv_bits: int = 4
    seed: int = 0  # the random signs of the residual rotation

    def _name(self) -> str:
        return "quarot"


# --------------------------------------------------------------------------- online Hadamard


def online_hadamard(x: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """The run-time rotation of a linear's input: none (``outer == 0``), the normalized Hadamard of order
    ``outer`` over the whole last dimension (``inner == 1``), or across ``outer`` blocks of ``inner``
    (x viewed [..., outer, inner], transformed along ``outer``: QuaRot's across-heads Hadamard)."""
    if outer == 0:
        return x
    if inner == 1:
        return hadamard_transform(x, -1)
    shape = x.shape
    return hadamard_transform(x.reshape(*shape[:-1], outer, inner), -2).reshape(shape)


def absorb_online_hadamard(w: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """``W'`` with ``W' T(x) = W x`` for the online transform ``T`` (orthogonal): T applied to W's rows."""
    return online_hadamard(w, outer, inner)


def _rotated_pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    m = cast(RotatedLinear, mod)
    x = online_hadamard(args[0], m.had_outer, m.had_inner)
    if m.a_bits < 16:
        x = fake_quantize_sym(x, m.a_bits, m.a_clip)
    return (x, *args[1:])


class RotatedLinear(nn.Linear):
    """An ``nn.Linear`` (float weight) whose input is rotated online and optionally fake-quantized per token.

    The rotation runs in a forward pre-hook, so forward hooks (GPTQ's Hessians) see the rotated input.
    """

    had_outer: int
    had_inner: int
    a_bits: int
    a_clip: float

    @classmethod
    def convert(cls, lin: nn.Linear, outer: int = 0, inner: int = 1) -> RotatedLinear:
        if isinstance(lin, RotatedLinear):
            lin.had_outer, lin.had_inner = outer, inner
            return lin
        if type(lin) is not nn.Linear:
            raise ConfigError(f"quarot: expected a plain nn.Linear, got {type(lin).__name__}")
        lin.__class__ = cls
        r = cast(RotatedLinear, lin)
        r.had_outer, r.had_inner, r.a_bits, r.a_clip = outer, inner, 16, 1.0
        r.register_forward_pre_hook(_rotated_pre_hook)
        return r

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, had=({self.had_outer}, {self.had_inner}), a_bits={self.a_bits}"


# --------------------------------------------------------------------------- the quantized linear


class W4A4Linear(QuantizedModule):
    """Symmetric per-channel int weights (4 bits: packed two per byte; 8 bits: int8) with an fp16 scale per
    output channel; the input rotated online (optional) and quantized per token (``a_bits`` < 16) for an
    integer GEMM on the codes, else multiplied in float with the dequantized weight."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, w_bits: int = 4, a_bits: int = 4, a_clip: float = 1.0,
                 had_outer: int = 0, had_inner: int = 1, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if w_bits not in (4, 8) or a_bits not in (4, 8, 16):
            raise ValueError(f"W4A4Linear: w_bits {w_bits} (4, 8), a_bits {a_bits} (4, 8, 16)")
        if w_bits == 4 and in_features % 2:
            raise ValueError(f"W4A4Linear: 4-bit codes pack in pairs; in_features {in_features} is odd")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.a_clip = w_bits, a_bits, a_clip
        self.had_outer, self.had_inner = had_outer, had_inner
        shape = (out_features, in_features // 2) if w_bits == 4 else (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8 if w_bits == 4 else torch.int8,
                                                    device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.packed = True

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, w_bits: int, a_bits: int, a_clip: float,
                   had_outer: int = 0, had_inner: int = 1, bias: torch.Tensor | None = None) -> W4A4Linear:
        """Signed codes [out, in] in [-2^(b-1), 2^(b-1) - 1] and fp16-representable scales [out]."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, w_bits, a_bits, a_clip, had_outer, had_inner, bias is not None, device=codes.device)
        q = codes.to(torch.int8)
        m.qweight.copy_(pack_int4(q) if w_bits == 4 else q)
        m.weight_scale.copy_(scale.to(torch.float16))
        if bias is not None:
            assert m.bias is not None
            m.bias.copy_(bias.float())
        return m

    @classmethod
    def from_weight(cls, w: torch.Tensor, w_bits: int, a_bits: int, a_clip: float, mse: bool = True,
                    had_outer: int = 0, had_inner: int = 1, bias: torch.Tensor | None = None) -> W4A4Linear:
        """RTN: per-channel symmetric scale (with the clipping search when ``mse``), round to nearest."""
        scale = weight_scale_sym(w, w_bits, mse=mse)
        return cls.from_codes(sym_codes(w, scale, w_bits), scale, w_bits, a_bits, a_clip, had_outer, had_inner, bias)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes().float() * self.weight_scale.float().unsqueeze(1)

    def storage(self) -> Storage:
        return Storage(packed_weights=tensor_bytes(self.qweight), scales_zeros=tensor_bytes(self.weight_scale),
                       unquantized=tensor_bytes(self.bias), quantized_weights=self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = online_hadamard(x.float(), self.had_outer, self.had_inner).reshape(-1, shape[-1])
        if self.a_bits < 16:
            xq, xs = quantize_per_token_sym(x2, self.a_bits, self.a_clip)
            if self.packed:
                if self.w_bits == 4:
                    y = w4a4_matmul(xq, xs, self.qweight, self.weight_scale, self.bias)
                else:
                    y = int8mm.int8_matmul(xq, xs, self.qweight, self.weight_scale.float(), self.bias)
            else:
                y = F.linear(xq.float() * xs.unsqueeze(-1), self.dequantized_weight(), self.bias)
        else:
            y = F.linear(x2, self.dequantized_weight(), self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"a_clip={self.a_clip}, had=({self.had_outer}, {self.had_inner}), packed={self.packed}")


# --------------------------------------------------------------------------- attention: QK Hadamard, KV quant


def _attention_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                       attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any) -> Any:
    """The llama attention with QuaRot's additions after RoPE: the online Hadamard on queries and keys
    (``quarot_qk_had``) and the K/V quantize-dequantize (``quarot_kv_bits`` < 16), before the cache."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    else:
        kwargs.pop("past_key_values", None)
    tf = sys.modules[self._quarot_base_module]  # the transformers modeling module of the base class
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = tf.apply_rotary_pos_emb(q, k, cos, sin)
    if self.quarot_qk_had:
        q, k = hadamard_transform(q, -1), hadamard_transform(k, -1)
    if self.quarot_kv_bits < 16:
        k = fake_quantize_asym(k, self.quarot_kv_bits, self.quarot_kv_clip, self.head_dim)
        v = fake_quantize_asym(v, self.quarot_kv_bits, self.quarot_kv_clip, self.head_dim)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = tf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, tf.eager_attention_forward)
    dropout = 0.0 if not self.training else self.attention_dropout
    out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


_ATTENTION_CLASSES: dict[type, type] = {}


def patch_attention(attn: nn.Module, qk_had: bool, kv_bits: int = 16, kv_clip: float = 1.0) -> None:
    """Give a llama-style attention module QuaRot's forward (a subclass of its own class)."""
    base = type(attn)
    if base in _ATTENTION_CLASSES.values():
        base = base.__mro__[1]
    tf = sys.modules[base.__module__]
    if not all(hasattr(tf, n) for n in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")):
        raise ConfigError(f"quarot: {base.__name__} is not a llama-style attention (no RoPE helpers in its module)")
    if base not in _ATTENTION_CLASSES:
        _ATTENTION_CLASSES[base] = type(f"QuaRot{base.__name__}", (base,),
                                        {"forward": _attention_forward, "_quarot_base_module": base.__module__})
    attn.__class__ = _ATTENTION_CLASSES[base]
    a = cast(Any, attn)
    a.quarot_qk_had, a.quarot_kv_bits, a.quarot_kv_clip = qk_had, kv_bits, kv_clip


# --------------------------------------------------------------------------- rotation


def _layers(model: nn.Module) -> list[Any]:
    """The decoder blocks (typed Any: transformers' blocks are reached through their attributes)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("quarot: only llama-style models (model.model.layers) are supported")
    for layer in layers:
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"quarot: a decoder block has no {path}: not a llama-style model") from None
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if "rmsnorm" not in type(norm).__name__.lower() or "gemma" in type(norm).__name__.lower():
                raise ConfigError(f"quarot: {type(norm).__name__} is not a plain RMSNorm (x / rms * w): not folded")
    return list(layers)


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    cfg: Any = model.config
    nh, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    return cfg.hidden_size, nh, nkv, dh


def untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight (a copy of the embedding's) and mark the config untied."""
    m: Any = model
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (m.config, getattr(m.config, "get_text_config", lambda: m.config)())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data.copy_(value.to(p.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Steps 1-3: fold norms, rotate the residual stream by ``Q``, fold the online Hadamards' offline halves
    and install the online ones (RotatedLinear pre-hooks, the attention's QK Hadamard).  fp function kept."""
    m: Any = model
    layers = _layers(model)
    d, nh, nkv, dh = _shape(model)
    if not (hadamard_exists(dh) and hadamard_exists(d)):
        raise ConfigError(f"quarot: no Hadamard matrix of order {dh if not hadamard_exists(dh) else d}")
    inter = layers[0].mlp.down_proj.in_features
    hadamard_factors(inter)  # raises naming the order when there is none
    heads_mode = hadamard_exists(nh)
    o_had = (nh, dh) if heads_mode else (nh * dh, 1)
    untie_lm_head(model)
    emb, head, final_norm = m.get_input_embeddings(), m.get_output_embeddings(), m.model.norm
    Q = random_hadamard_matrix(d, seed).to(emb.weight.device)  # float64, built on the CPU

    def fold(norm: nn.Module, lins: list[nn.Linear]) -> None:
        g = cast(torch.Tensor, norm.weight).double()
        for lin in lins:
            _set(lin.weight, lin.weight.double() * g[None, :])
        cast(torch.Tensor, norm.weight).fill_(1.0)

    _set(emb.weight, emb.weight.double() @ Q)
    for layer in layers:
        at, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            _set(lin.weight, lin.weight.double() @ Q)
        for lin in (at.o_proj, mlp.down_proj):
            _set(lin.weight, Q.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ Q)
        # values per head: v_h -> H v_h (v_proj's rows of each head); o_proj absorbs it and the online one
        wv = at.v_proj.weight.double().reshape(nkv, dh, -1)
        _set(at.v_proj.weight, hadamard_transform(wv, 1).reshape(nkv * dh, -1))
        if at.v_proj.bias is not None:
            _set(at.v_proj.bias, hadamard_transform(at.v_proj.bias.double().reshape(nkv, dh), -1).reshape(-1))
        wo = at.o_proj.weight.double()
        wo = hadamard_transform(wo.reshape(d, nh, dh), -1).reshape(d, nh * dh)
        _set(at.o_proj.weight, absorb_online_hadamard(wo, *o_had))
        _set(mlp.down_proj.weight, absorb_online_hadamard(mlp.down_proj.weight.double(), inter, 1))
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            RotatedLinear.convert(lin)
        RotatedLinear.convert(at.o_proj, *o_had)
        RotatedLinear.convert(mlp.down_proj, inter, 1)
        patch_attention(at, qk_had=True)
    fold(final_norm, [head])
    _set(head.weight, head.weight.double() @ Q)
    return {"residual_hadamard": list(hadamard_factors(d)), "down_proj_hadamard": list(hadamard_factors(inter)),
            "o_proj_online": "across heads" if heads_mode else f"full order {nh * dh} ({nh} heads: no H_{nh})",
            "head_hadamard": list(hadamard_factors(dh))}


# --------------------------------------------------------------------------- methods


def _had_of(mod: nn.Module) -> tuple[int, int]:
    return getattr(mod, "had_outer", 0), getattr(mod, "had_inner", 1)


@register
class W4A4(Method):
    """Naive W4A4 (+ optional KV): QuaRot's quantizers on the unrotated model (the paper's baseline)."""

    name = "w4a4"
    config_cls = W4A4Config
    target = "weights+activations+kv"
    rotate: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.weights == "gptq"  # type: ignore[attr-defined]

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: W4A4Config = self.config  # type: ignore[assignment]
        t0 = time.perf_counter()
        layers = _layers(model)
        if self.rotate:
            self.artifacts["rotation"] = rotate_model(model, cast(QuaRotConfig, c).seed)
        names = [n for n, _ in iter_linears(model, c.include, c.exclude) if n.startswith("model.layers.")]
        hads = {n: _had_of(model.get_submodule(n)) for n in names}  # GPTQ replaces the modules
        if c.w_bits < 16 and c.weights == "gptq":
            if calib is None:
                raise ConfigError(f"{self.name}: weights=gptq needs calibration data")
            self._gptq(model, calib, names)
        for n in names:
            lin = model.get_submodule(n)
            had = hads[n]
            if isinstance(lin, IntQuantLinear):  # GPTQ's result: signed codes = code - zero (zero = 8)
                g = lin.g_idx.long()
                codes = (lin.codes().float() - lin.zeros().float()[g]).t()
                scale = lin.scales.float()[0]
                q = W4A4Linear.from_codes(codes, scale, c.w_bits, c.a_bits, c.a_clip_ratio, *had, bias=lin.bias)
            elif c.w_bits < 16:
                lin = cast(nn.Linear, lin)
                q = W4A4Linear.from_weight(lin.weight.data, c.w_bits, c.a_bits, c.a_clip_ratio, c.w_clip, *had,
                                           bias=None if lin.bias is None else lin.bias.data)
            else:
                r = RotatedLinear.convert(cast(nn.Linear, lin), *had)
                r.a_bits, r.a_clip = c.a_bits, c.a_clip_ratio
                continue
            set_module(model, n, q)
        for layer in layers:
            patch_attention(layer.self_attn, self.rotate, c.kv_bits, c.kv_clip_ratio)
        self.artifacts.update(quantized_modules=len(names), quantize_seconds=round(time.perf_counter() - t0, 3))
        return model

    def _gptq(self, model: nn.Module, calib: Calibration, names: list[str]) -> None:
        c: W4A4Config = self.config  # type: ignore[assignment]
        g = GPTQ(GPTQConfig(bits=c.w_bits, group_size=-1, sym=True, act_order=c.act_order, percdamp=c.percdamp,
                            mse=c.w_clip, include=tuple(names), exclude=()))
        g.quantize(model, calib)
        if hasattr(model, "gptq_config"):  # GPTQ marks its models for the GPTQ checkpoint export: not this layout
            del model.gptq_config
        self.artifacts.update({f"gptq_{k}": v for k, v in g.artifacts.items() if k.startswith("gptq_loss")})

    # -- the KV cache: per head and token, asymmetric int codes with an fp16 scale and zero

    def make_cache(self, model: nn.Module) -> Any:
        c: W4A4Config = self.config  # type: ignore[assignment]
        _, _, _, dh = _shape(model)
        spec = KVSpec("int", "token", c.kv_bits, dh) if c.kv_bits < 16 else KVSpec()
        return QuantizedKVCache([(spec, spec) for _ in _layers(model)])

    def kv_cache_bytes(self, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                       key_outliers: int | None = None) -> dict[str, float]:
        c: W4A4Config = self.config  # type: ignore[assignment]
        L, H, D, T, B = n_layers, n_kv_heads, head_dim, tokens, batch
        if c.kv_bits >= 16:
            return fp16_cache_bytes(n_layers=L, n_kv_heads=H, head_dim=D, tokens=T, batch=B)
        return cache_bytes(codes=2 * L * B * H * T * D * c.kv_bits / 8, scales=2 * L * B * H * T * 4)


@register
class QuaRot(W4A4):
    """QuaRot (Ashkboos et al., 2024): Hadamard-rotated W4A4KV4 (RTN or GPTQ weights)."""

    name = "quarot"
    config_cls = QuaRotConfig
    rotate = True
