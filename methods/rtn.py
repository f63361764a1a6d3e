"""Round-to-nearest weight-only quantization (the baseline of the GPTQ/AWQ papers).

Each selected ``nn.Linear`` is quantized row-wise on a uniform min-max grid, per group of
``group_size`` input columns (``-1``: one group per output channel), symmetric or asymmetric,
and replaced by an :class:`~quantbench.methods.qlinear.IntQuantLinear` holding packed codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..kernels.intq import grid_params, quantize_codes
from .base import (
    DEFAULT_SKIP,
    Calibration,
    ConfigError,
    Method,
    MethodConfig,
    iter_linears,
    register,
    set_module,
)
from .qlinear import IntQuantLinear


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"rtn: bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"rtn: group_size must be positive or -1 (per channel), got {self.group_size}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


def rtn_quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [out, in], scales and integer zeros [out, n_groups] for a weight [out, in]."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)  # a last, shorter group when gs does not divide in_f (as in GPTQ's g_idx)
    w = w.float()
    pad = n_groups * gs - in_f
    # pad the last group with copies of its own last column: its min and max are unchanged
    wp = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1) if pad else w
    wg = wp.reshape(out_f, n_groups, gs)
    # the packed layout stores fp16 scales: codes are computed against the scale dequantization uses
    scale, zero = grid_params(wg.amin(-1), wg.amax(-1), bits, sym, scale_dtype=torch.float16)
    codes = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return codes.reshape(out_f, n_groups * gs)[:, :in_f].to(torch.int32), scale, zero


@register
class RTN(Method):
    name = "rtn"
    config_cls = RTNConfig

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: RTNConfig = self.config  # type: ignore[assignment]
        layers = list(iter_linears(model, c.include, c.exclude))
        for name, lin in tqdm(layers, desc="rtn", leave=False):
            codes, scales, zeros = rtn_quantize_weight(lin.weight.data, c.bits, c.group_size, c.sym)
            q = IntQuantLinear.from_codes(
                codes, scales, zeros, c.bits, c.group_size,
                bias=None if lin.bias is None else lin.bias.data.clone(), sym=c.sym,
            )
            set_module(model, name, q)
        self.artifacts["quantized_modules"] = len(layers)
        return model
