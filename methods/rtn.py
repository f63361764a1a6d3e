"""Round-to-nearest weight-only quantization (the baseline of the GPTQ/AWQ papers).

Each selected ``nn.Linear`` is quantized row-wise on a uniform min-max grid, per group of
``group_size`` input columns (``-1``: one group per output channel), symmetric or asymmetric,
and replaced by an :class:`~quantbench.methods.qlinear.IntQuantLinear` holding packed codes.
A per-module plan (``quantize(model, calib, plan=...)``, ``{module: (bits, group_size)}``) gives
modules their own grid; mixed precision runs RTN through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..kernels.intq import grid_params, quantize_codes
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    iter_linears,
    register,
    set_module,
)
from .qlinear import IntQuantLinear
from .quantize import ModulePlan, module_configs


@dataclass(frozen=True)
class RTNConfig(ModuleSelection):
    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"rtn: bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"rtn: group_size must be in 1..{1 << 20} or -1 (per channel), got {self.group_size}")


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
    """Round-to-nearest on a uniform min-max grid per group of inputs (no calibration)."""

    name = "rtn"
    config_cls = RTNConfig

    def quantize(self, model: nn.Module, calib: Calibration | None, plan: ModulePlan | None = None) -> nn.Module:
        """Quantize the selected linears; ``plan`` gives modules their own (bits, group_size) (None: skip)."""
        c: RTNConfig = self.config  # type: ignore[assignment]
        linears = list(iter_linears(model, c.include, c.exclude))
        configs = module_configs(c, (name for name, _ in linears), plan, "rtn")
        layers = [(name, lin) for name, lin in linears if name in configs]
        for name, lin in tqdm(layers, desc="rtn", leave=False, disable=None):
            mc = configs[name]
            codes, scales, zeros = rtn_quantize_weight(lin.weight.data, mc.bits, mc.group_size, mc.sym)
            q = IntQuantLinear.from_codes(
                codes, scales, zeros, mc.bits, mc.group_size,
                bias=None if lin.bias is None else lin.bias.data.clone(), sym=mc.sym,
            )
            set_module(model, name, q)
        self.artifacts["quantized_modules"] = len(layers)
        return model
