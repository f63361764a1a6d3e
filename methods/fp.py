"""Unquantized baseline: the model in a floating-point dtype (float32, bfloat16 or float16)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .base import Calibration, Method, MethodConfig, check_choice, register


@dataclass(frozen=True)
class FPConfig(MethodConfig):
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("fp", "dtype", self.dtype, ("float32", "bfloat16", "float16"))


@register
class FP(Method):
    name = "fp"
    config_cls = FPConfig

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        dtype = getattr(torch, cast(FPConfig, self.config).dtype)
        return model if dtype == torch.float32 else model.to(dtype)
