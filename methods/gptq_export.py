"""Export GPTQ-quantized models as GPTQ checkpoints (safetensors + ``quantize_config.json``), and load them back.

The convention of AutoGPTQ / GPTQModel / transformers (``checkpoint_format: gptq``, the "v1" format):
each quantized linear ``NAME`` is stored as ``NAME.qweight`` (int32 [in * bits / 32, out]),
``NAME.qzeros`` (int32 [n_groups, out * bits / 32], zero points stored **minus one**, modulo 2**bits),
``NAME.scales`` (fp16 [n_groups, out]), ``NAME.g_idx`` (int32 [in]) and ``NAME.bias``; every other
tensor is stored as in the model.  ``config.json`` carries the same ``quantization_config`` as
``quantize_config.json``.

A zero point of 0 (a group whose values are all >= 0, asymmetric grids only) is stored as
2**bits - 1 by the v1 convention; loaders that add 1 without wrapping read 2**bits for it (a known
quirk of the v1 format); :func:`load_gptq_checkpoint` wraps it back to 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..kernels.intq import pack_bits, unpack_bits
from .base import set_module
from .qlinear import IntQuantLinear

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` of a model whose linears are :class:`IntQuantLinear`."""
    layers = [m for m in model.modules() if isinstance(m, IntQuantLinear)]
    if not layers:
        raise ValueError("the model has no IntQuantLinear layers to export")
    first = layers[0]
    if any((m.bits, m.group_size, m.sym) != (first.bits, first.group_size, first.sym) for m in layers):
        log.warning("layers differ in bits/group_size/sym; quantize_config.json records the first layer's")
    per_channel = first.group_size == first.in_features
    run = getattr(model, "gptq_config", None) or {}  # set by the gptq method; absent for rtn models
    return {
        "quant_method": "gptq",
        "bits": first.bits,
        "group_size": -1 if per_channel else first.group_size,
        "desc_act": any(m.has_act_order() for m in layers),
        "sym": first.sym,
        "true_sequential": bool(run.get("true_sequential", False)),
        "static_groups": bool(run.get("static_groups", False)),
        "damp_percent": float(run.get("percdamp", 0.0)),
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["quantbench"]},
    }


def zeros_to_v1(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    z = unpack_bits(qzeros, bits, out_features, dim=1)
    return pack_bits((z - 1) & (2**bits - 1), bits, dim=1)


def zeros_from_v1(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    z = unpack_bits(qzeros, bits, out_features, dim=1)
    return pack_bits((z + 1) & (2**bits - 1), bits, dim=1)


def gptq_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors to save: GPTQ buffers (v1 zeros) for quantized linears, everything else as is, tied once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:
            continue  # tied (e.g. lm_head = embed_tokens): transformers re-ties it on load
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    for name, mod in model.named_modules():
        if isinstance(mod, IntQuantLinear):
            out[f"{name}.qzeros"] = zeros_to_v1(mod.qzeros, mod.bits, mod.out_features)
    return out


def export_gptq(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``quantize_config.json`` (and the tokenizer) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qcfg = quantization_config(model)
    save_file(gptq_state_dict(model), str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    cfg = cast("PretrainedConfig", model.config).to_dict()
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    log.info("wrote GPTQ checkpoint %s (%d-bit, group %s)", out, qcfg["bits"], qcfg["group_size"])
    return out


def load_gptq_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a causal LM from a GPTQ (v1) checkpoint with :class:`IntQuantLinear` layers."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qcfg = json.loads((path / "quantize_config.json").read_text())
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized modules ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = load_file(str(path / SAFETENSORS_NAME))
    bits, sym = int(qcfg["bits"]), bool(qcfg.get("sym", False))
    for key in [k for k in sd if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        in_f, out_f = sd[f"{name}.g_idx"].shape[0], sd[f"{name}.scales"].shape[1]
        gs = int(qcfg["group_size"])
        layer = IntQuantLinear(in_f, out_f, bits, gs, bias=f"{name}.bias" in sd, sym=sym, dtype=dtype)
        set_module(model, name, layer)
        sd[f"{name}.qzeros"] = zeros_from_v1(sd[f"{name}.qzeros"], bits, out_f)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"unexpected tensors in {path}: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    really_missing = [k for k in missing if "lm_head" not in k or not getattr(config, "tie_word_embeddings", False)]
    if really_missing:
        raise ValueError(f"tensors missing from {path}: {really_missing[:5]}")
    return model.eval()
