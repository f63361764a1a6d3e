"""Absmax round-to-nearest: symmetric per-output-channel integer weights, ``scale = max|w| / (2^(b-1) - 1)``.

The weight-only scheme of LLM.int8()'s vector-wise quantization (Dettmers et al., 2022, §3.1) and of
torchao's symmetric per-channel int8 weight config: each output row ``w`` gets one scale
``s = max|w| / qmax`` with ``qmax = 2^(bits-1) - 1``, codes ``q = round(w / s)`` in ``[-qmax, qmax]``
(the most negative code is unused, so the grid is symmetric around 0), and ``w_hat = s * q``.
Unlike ``rtn`` with ``sym: true`` (which spans the full ``2^bits`` codes on ``[-max|w|, max|w|]``),
zero is exactly representable and the scale is the textbook absmax one.  Stored in the GPTQ layout
(:class:`~quantbench.methods.qlinear.IntQuantLinear`, codes offset by ``2^(bits-1)``), so it runs on
the packed integer kernels (8 bits per channel on torch's int8 CPU op).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .base import Calibration, ConfigError, Method, ModuleSelection, iter_linears, register, set_module
from .qlinear import IntQuantLinear


@dataclass(frozen=True)
class AbsmaxConfig(ModuleSelection):
    bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"absmax: bits must be 2, 4 or 8, got {self.bits}")


def absmax_quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes [out, in] in [-qmax, qmax] and fp16 scales [out, 1] of a weight [out, in]."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.float().abs().amax(dim=1, keepdim=True)
    # the stored scale is fp16: codes are computed against the scale the kernels will use
    scale = (amax / qmax).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16).float()
    codes = torch.clamp(torch.round(w.float() / scale), -qmax, qmax).to(torch.int32)
    return codes, scale


@register
class Absmax(Method):
    name = "absmax"
    config_cls = AbsmaxConfig

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(AbsmaxConfig, self.config)
        offset = 2 ** (c.bits - 1)
        for name, lin in list(iter_linears(model, c.include, c.exclude)):
            codes, scale = absmax_quantize_weight(lin.weight.data, c.bits)
            q = IntQuantLinear.from_codes(
                codes + offset, scale, torch.full_like(scale, offset), c.bits, group_size=-1,
                bias=None if lin.bias is None else lin.bias.data.clone(), sym=True,
            )
            set_module(model, name, q)
        return model
