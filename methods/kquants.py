"""llama.cpp quantization presets (k-quants, llama.cpp PR #1684, and the legacy Q4_0..Q8_0 formats).

Steps, as ``llama-quantize`` does them (src/llama-quant.cpp):
1. (``imatrix``) collect the importance matrix: per input column of every linear, E[x^2] over the
   calibration tokens (llama-imatrix);
2. choose each tensor's ggml type from the preset (``llama_tensor_get_type``): attn_v, ffn_down,
   attn_output, output and token_embd rules, ``use_more_bits`` layers, the GQA rule (n_gqa), then
   the fallback to a 32-block type when a row length is not a multiple of 256;
3. quantize each tensor in its type (kernels/ggml.py, with the importance-weighted searches when an
   imatrix is given) and keep the real block bytes (:class:`GGMLLinear`, :class:`GGMLTensor`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..kernels import ggml
from .base import (
    Calibration,
    Method,
    MethodConfig,
    QuantizedModule,
    QuantizedTensorModule,
    Storage,
    check_choice,
    dtype_name,
    register,
    set_module,
)
from .placement import model_device

log = logging.getLogger(__name__)

#: preset (llama_ftype) -> default ggml type
PRESETS: dict[str, str] = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
}

#: tensor_type_fallback: a 256-block type whose row length is not a multiple of 256
FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

#: bytes per block that hold scales/mins (the rest are the codes)
SCALE_BYTES: dict[str, int] = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 2, "Q5_1": 4, "Q8_0": 2,
                               "Q2_K": 20, "Q3_K": 14, "Q4_K": 16, "Q5_K": 16, "Q6_K": 18, "F16": 0, "F32": 0}

_HF_TO_GGUF = [
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", r"blk.\1.attn_q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", r"blk.\1.attn_k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", r"blk.\1.attn_v"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", r"blk.\1.attn_output"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", r"blk.\1.ffn_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", r"blk.\1.ffn_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", r"blk.\1.ffn_down"),
    (r"model\.embed_tokens", "token_embd"),
    (r"lm_head", "output"),
]


def gguf_name(hf_name: str) -> str:
    """llama.cpp tensor name (without ``.weight``) of an HF llama module name."""
    for pat, rep in _HF_TO_GGUF:
        if re.fullmatch(pat, hf_name):
            return re.sub(pat, rep, hf_name)
    return hf_name


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def fallback_type(qtype: str, ncols: int) -> str:
    """tensor_type_fallback: a compatible type when ncols is not a multiple of the block size."""
    if ncols % ggml.TYPES[qtype][0] == 0:
        return qtype
    new = FALLBACK.get(qtype)
    if new is None:
        raise ValueError(f"no fallback for {qtype} with row length {ncols}")
    return new if ncols % ggml.TYPES[new][0] == 0 else "F16"


def tensor_type(name: str, ncols: int, preset: str, n_layer: int, n_gqa: float, has_output: bool,
                has_imatrix: bool) -> str:
    """llama_tensor_get_type for a llama model (non-IQ presets), ``name`` in llama.cpp naming."""
    ftype, t = preset, PRESETS[preset]
    m = re.match(r"blk\.(\d+)\.", name)
    i_layer = int(m.group(1)) if m else 0
    if name == "output" or (not has_output and name == "token_embd"):
        if ncols % ggml.TYPES[t][0] != 0:
            t = "Q8_0"
        elif t != "Q8_0":
            t = "Q6_K"
    elif name == "token_embd":
        pass
    elif name.endswith("attn_v"):
        if ftype == "Q2_K":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i_layer < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layer):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i_layer < 4:
            t = "Q5_K"
    elif name.endswith("ffn_down"):
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i_layer < n_layer // 16 else "Q4_K"  # llama arch: never Q3_K here
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype == "Q4_K_M":
            if use_more_bits(i_layer, n_layer):
                t = "Q6_K"
        elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i_layer < n_layer // 8:
            t = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and has_imatrix and i_layer < n_layer // 8:
            t = "Q4_1" if ftype == "Q4_0" else "Q5_1"
    elif name.endswith("attn_output"):
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    return fallback_type(t, ncols)


# --------------------------------------------------------------------------- modules


def _ggml_storage(qdata: torch.Tensor, qtype: str, numel: int) -> Storage:
    total = int(qdata.numel())
    if qtype in ("F16", "F32"):
        return Storage(unquantized=total)
    n_blocks = total // ggml.TYPES[qtype][1]
    sz = n_blocks * SCALE_BYTES[qtype]
    return Storage(packed_weights=total - sz, scales_zeros=sz, quantized_weights=numel)


class GGMLLinear(QuantizedModule):
    """A linear layer stored as ggml blocks (uint8 ``qdata`` [out, row_bytes]); forward dequantizes.

    The dequantized weight is cached on first use (not a buffer; ``storage()`` counts the block bytes).
    """

    qdata: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, qdata: torch.Tensor, qtype: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("qdata", qdata)
        self.register_buffer("bias", bias)
        self._w: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> GGMLLinear:
        q = torch.from_numpy(ggml.quantize(w, qtype, imatrix)).to(w.device)  # blocks made on the CPU
        return cls(q, qtype, w.shape[1], w.shape[0], bias)

    def save_spec(self) -> dict[str, Any]:
        """The constructor's arguments, the block bytes' shape for ``qdata`` (:class:`~.base.Saveable`)."""
        return {"qtype": self.qtype, "in_features": self.in_features, "out_features": self.out_features,
                "qdata_shape": list(self.qdata.shape),
                "bias_dtype": None if self.bias is None else dtype_name(self.bias.dtype)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GGMLLinear:
        bias = None if spec["bias_dtype"] is None else torch.zeros(spec["out_features"],
                                                                   dtype=getattr(torch, spec["bias_dtype"]))
        return cls(torch.zeros(spec["qdata_shape"], dtype=torch.uint8), spec["qtype"], spec["in_features"],
                   spec["out_features"], bias)

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors, strict=True)
        self._w = None  # the dequantized cache of the old blocks

    def dequantized_weight(self) -> torch.Tensor:
        w = ggml.dequantize_torch(self.qdata, self.qtype, (self.out_features, self.in_features))
        return w.to(self.qdata.device)

    def kernel_path(self, device: torch.device) -> str:
        """The reference: the forward multiplies by a dense dequantized copy (llama.cpp serves the format)."""
        return "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._w is None or self._w.device != x.device:
            self._w = self.dequantized_weight().to(x.device)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._w.to(x.dtype), b)

    def storage(self) -> Storage:
        return _ggml_storage(self.qdata, self.qtype, self.in_features * self.out_features) + Storage(
            unquantized=0 if self.bias is None else int(self.bias.numel() * self.bias.element_size()))

    def extra_repr(self) -> str:
        return f"{self.qtype}, in={self.in_features}, out={self.out_features}"


class GGMLTensor(QuantizedTensorModule):
    """Token embedding / output matrix stored as ggml blocks; dequantized once (an embedding is a gather).

    ``weight`` is the dequantized [vocab, hidden] tensor (a buffer, shared with a tied lm_head);
    ``storage()`` counts the block bytes.  ``mode`` is "embedding" (gather) or "linear" (lm_head).
    ``embed_scale``: the scale a scaled embedding (Gemma 3: sqrt(hidden_size)) multiplies the looked-up rows by,
    as transformers does (``rows * embed_scale.to(weight.dtype)``); None for a plain embedding.
    """

    qdata: torch.Tensor
    weight: torch.Tensor
    embed_scale: torch.Tensor | None

    def __init__(self, qdata: torch.Tensor, qtype: str, shape: tuple[int, int], mode: str,
                 padding_idx: int | None = None, embed_scale: float | None = None) -> None:
        super().__init__()
        self.qtype, self.shape, self.mode, self.padding_idx = qtype, tuple(shape), mode, padding_idx
        self.register_buffer("qdata", qdata)
        self.register_buffer("weight", ggml.dequantize_torch(qdata, qtype, self.shape).to(qdata.device))
        self.register_buffer("embed_scale", None if embed_scale is None else
                             torch.tensor(float(embed_scale), device=qdata.device), persistent=False)
        self.num_embeddings, self.embedding_dim = self.shape

    def save_spec(self) -> dict[str, Any]:
        """The constructor's arguments, the block bytes' shape for ``qdata`` (:class:`~.base.Saveable`)."""
        return {"qtype": self.qtype, "shape": list(self.shape), "mode": self.mode, "padding_idx": self.padding_idx,
                "qdata_shape": list(self.qdata.shape), "dtype": dtype_name(self.weight.dtype),
                "embed_scale": None if self.embed_scale is None else float(self.embed_scale)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> GGMLTensor:
        m = cls(torch.zeros(spec["qdata_shape"], dtype=torch.uint8), spec["qtype"], tuple(spec["shape"]),
                spec["mode"], spec["padding_idx"], spec.get("embed_scale"))
        m.weight = m.weight.to(getattr(torch, spec["dtype"]))
        return m

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The blocks only: ``weight`` is their dequantization (``storage()`` counts the blocks)."""
        return {"qdata": self.qdata}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({"qdata": tensors["qdata"], "weight": self.weight}, strict=True)
        self.weight.copy_(ggml.dequantize_torch(self.qdata, self.qtype, self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "embedding":
            rows = F.embedding(x, self.weight, self.padding_idx)
            return rows if self.embed_scale is None else rows * self.embed_scale.to(self.weight.dtype)
        return F.linear(x, self.weight.to(x.dtype))

    def storage(self) -> Storage:
        return _ggml_storage(self.qdata, self.qtype, self.weight.numel())


# --------------------------------------------------------------------------- method


@dataclass(frozen=True)
class LlamaCppConfig(MethodConfig):
    preset: str = "Q4_K_M"
    imatrix: bool = False
    #: 2: the k-quant searches follow llama.cpp's reference order of operations (byte-identical to llama-quantize)
    version: ClassVar[int] = 2

    def __post_init__(self) -> None:
        check_choice("llamacpp", "preset", self.preset, PRESETS)
        check_choice("llamacpp", "imatrix", self.imatrix, [True, False])


@torch.no_grad()
def collect_imatrix(model: nn.Module, calib: Calibration, names: list[str]) -> dict[str, torch.Tensor]:
    """llama-imatrix: per input column, the mean of x^2 over all calibration tokens, for each linear."""
    sums: dict[str, torch.Tensor] = {}
    counts: Counter[str] = Counter()
    hooks = []

    def hook(name: str):
        def fn(_mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[name] = sums.get(name, torch.zeros(x.shape[1], device="cpu")) + (x * x).sum(0).cpu()
            counts[name] += x.shape[0]
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        for batch in tqdm(list(calib.batches(1)), desc="imatrix", leave=False, disable=None):
            model(batch.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def embedding_scale(emb: nn.Module) -> float | None:
    """The factor a scaled embedding (transformers' Gemma 3: an ``embed_scale`` buffer, sqrt(hidden_size))
    multiplies its rows by, rounded to the weight's dtype as its forward does; None for a plain embedding."""
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return None
    weight = cast(torch.Tensor, emb.weight)
    return float(torch.as_tensor(scale).to(weight.dtype))


@register
class LlamaCpp(Method):
    """llama.cpp ``llama-quantize`` presets with optional importance matrix (k-quants, PR #1684)."""

    name = "llamacpp"
    config_cls = LlamaCppConfig
    #: quantbench runs this format through float32 weights dequantized once (a reference path, not the
    #: format's speed): latency is timed in llama.cpp itself, on the exported GGUF, or is unavailable
    serving_engine = "llama.cpp"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return bool(self.config.imatrix)  # type: ignore[attr-defined]

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: LlamaCppConfig = self.config  # type: ignore[assignment]
        cfg: Any = model.config  # the transformers config; its attributes depend on the architecture
        n_layer = cfg.num_hidden_layers
        n_gqa = cfg.num_attention_heads / getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        emb = cast(Any, model).get_input_embeddings()  # transformers PreTrainedModel methods
        head = cast(Any, model).get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        has_output = head is not None and not tied
        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
        # 1. importance matrix
        imat: dict[str, torch.Tensor] = {}
        if c.imatrix:
            if calib is None:
                raise ValueError("llamacpp: imatrix=True needs calibration data")
            names = [n for n, _ in linears] + (["lm_head"] if head is not None else [])
            imat = collect_imatrix(model, calib, names)
        # 2.+3. per-tensor type, quantize
        types: dict[str, str] = {}
        for name, lin in tqdm(linears, desc=f"llamacpp {c.preset}", leave=False, disable=None):
            gname = gguf_name(name)
            t = tensor_type(gname, lin.in_features, c.preset, n_layer, n_gqa, has_output, bool(imat))
            types[gname] = t
            q = GGMLLinear.from_weight(lin.weight.data, t, imat.get(name),
                                       None if lin.bias is None else lin.bias.data.clone())
            set_module(model, name, q)
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        te = tensor_type("token_embd", emb.weight.shape[1], c.preset, n_layer, n_gqa, has_output, bool(imat))
        types["token_embd"] = te
        emb_imat = imat.get("lm_head") if tied else None
        emb_q = torch.from_numpy(ggml.quantize(emb.weight.data, te, emb_imat)).to(emb.weight.device)
        new_emb = GGMLTensor(emb_q, te,
                             tuple(emb.weight.shape), "embedding", emb.padding_idx, embedding_scale(emb))
        set_module(model, emb_name, new_emb)
        if tied:
            head.weight = nn.Parameter(new_emb.weight, requires_grad=False)  # same storage as the buffer
        elif head is not None:
            to = tensor_type("output", head.in_features, c.preset, n_layer, n_gqa, has_output, bool(imat))
            types["output"] = to
            qo = torch.from_numpy(ggml.quantize(head.weight.data, to, imat.get("lm_head"))).to(head.weight.device)
            set_module(model, "lm_head", GGMLTensor(qo, to, tuple(head.weight.shape), "linear"))
        hist = Counter(types.values())
        self.artifacts["tensor_types"] = types
        self.artifacts["type_histogram"] = dict(sorted(hist.items()))
        self.artifacts["imatrix"] = bool(imat)
        log.info("llamacpp %s: %s", c.preset, dict(hist))
        return model
