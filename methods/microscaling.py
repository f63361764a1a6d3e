"""Block-scaled FP4 weights (OCP MXFP4, NVIDIA NVFP4), weight-only or with FP4 activations (W4A4).

The formats are :mod:`quantbench.kernels.fp4`'s: E2M1 elements two per byte, with one E8M0
power-of-two scale per 32 elements (MXFP4, 4.25 bits per weight) or one float8_e4m3fn scale per 16
elements and a float32 scale per tensor (NVFP4, 4.5 bits per weight + 32 bits).  Blocks run along the
input dimension of each linear, which must be a multiple of the block size (32 or 16).

Four methods, no calibration:

- ``mxfp4``, ``nvfp4`` (``target = "weights"``): weight-only; the forward dequantizes the weight and runs
  ``F.linear`` (the reference path: torch has no CPU FP4 kernel);
- ``mxfp4-a4``, ``nvfp4-a4`` (``target = "weights+activations"``): W4A4; each token's input activation
  is quantized dynamically in the same format along K (blocks of 32 / 16; for NVFP4 the float32 scale
  is that token's own ``amax / (448 * 6)``), dequantized, and multiplied with the dequantized weight.
  This is a *simulated* reference of FP4 x FP4 tensor-core GEMMs (the products are the same
  E2M1 x E2M1 values times the same scales, accumulated in float32), not a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fp4
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    QuantizedModule,
    Storage,
    bias_dtype_name,
    iter_linears,
    register,
    set_module,
    tensor_bytes,
)

FORMATS = ("mxfp4", "nvfp4")
BLOCK = {"mxfp4": fp4.MX_BLOCK, "nvfp4": fp4.NV_BLOCK}


class FP4Linear(QuantizedModule):
    """A linear with MXFP4 or NVFP4 weights; ``act_fp4`` quantizes its input activations the same way.

    Buffers:
    - ``qweight`` uint8 [out, in / 2]: E2M1 codes, element ``2i`` of a row in the low nibble of byte ``i``;
    - MXFP4: ``scale_exp`` uint8 [out, in / 32]: E8M0 biased exponents;
    - NVFP4: ``block_scale`` float8_e4m3fn [out, in / 16] and ``tensor_scale`` float32 []: the weight is
      ``e2m1 * float32(block_scale) * tensor_scale``;
    - ``bias`` (optional, kept in floating point).
    """

    qweight: torch.Tensor
    scale_exp: torch.Tensor | None
    block_scale: torch.Tensor | None
    tensor_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, fmt: str, act_fp4: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"FP4Linear: format {fmt!r}; valid: {FORMATS}")
        if in_features % BLOCK[fmt]:
            raise ValueError(f"FP4Linear: {fmt} needs in_features a multiple of {BLOCK[fmt]}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.act_fp4 = fmt, act_fp4
        n_blocks = in_features // BLOCK[fmt]
        mx = fmt == "mxfp4"
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale_exp",
                             torch.zeros(out_features, n_blocks, dtype=torch.uint8, device=device) if mx else None)
        self.register_buffer("block_scale", None if mx else
                             torch.zeros(out_features, n_blocks, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("tensor_scale", None if mx else torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.packed = False  # only the dequantized reference path exists

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, act_fp4: bool = False) -> FP4Linear:
        m = cls(linear.in_features, linear.out_features, fmt, act_fp4, linear.bias is not None, linear.weight.dtype,
                device=linear.weight.device)
        w = linear.weight.data.float()
        if fmt == "mxfp4":
            mxq = fp4.quantize_mx(w)
            m.qweight.copy_(mxq.codes)
            cast(torch.Tensor, m.scale_exp).copy_(mxq.exponents)
        else:
            nvq = fp4.quantize_nv(w)
            m.qweight.copy_(nvq.codes)
            cast(torch.Tensor, m.block_scale).copy_(nvq.block_scales)
            cast(torch.Tensor, m.tensor_scale).copy_(nvq.global_scale)
        if linear.bias is not None:
            cast(torch.Tensor, m.bias).copy_(linear.bias.data)
        return m

    def save_spec(self) -> dict[str, object]:
        """The constructor's arguments (:class:`~quantbench.methods.base.Saveable`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "fmt": self.fmt,
                "act_fp4": self.act_fp4, "bias": self.bias is not None,
                "dtype": bias_dtype_name(self.bias)}

    # -- storage ----------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        if self.fmt == "mxfp4":
            return fp4.dequantize_mx(self.qweight, cast(torch.Tensor, self.scale_exp))
        return fp4.dequantize_nv(self.qweight, cast(torch.Tensor, self.block_scale),
                                 cast(torch.Tensor, self.tensor_scale))

    def storage(self) -> Storage:
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            scales_zeros=tensor_bytes(self.scale_exp, self.block_scale, self.tensor_scale),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    # -- execution --------------------------------------------------------------------
    def quantize_input(self, x2d: torch.Tensor) -> torch.Tensor:
        """The activation [M, K] as its FP4 values (float32), quantized per token along K."""
        if self.fmt == "mxfp4":
            return fp4.dequantize_mx(*fp4.quantize_mx(x2d))
        per_token = fp4.nv_global_scale(x2d.float().abs().amax(-1, keepdim=True))
        return fp4.dequantize_nv(*fp4.quantize_nv(x2d, per_token))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        xin = self.quantize_input(x2d) if self.act_fp4 else x2d.float()
        y = F.linear(xin, self.dequantized_weight(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, act_fp4={self.act_fp4}"

    def kernel_path(self, device: torch.device) -> str:
        """Always the reference: the forward dequantizes the FP4 codes and runs an fp32 GEMM (no FP4 GEMM here)."""
        return "reference"


@dataclass(frozen=True)
class MicroscalingConfig(ModuleSelection):
    """The linears to quantize; the formats have no free parameters (block sizes and scales are the specs')."""


class _Microscaling(Method):
    config_cls = MicroscalingConfig
    needs_calibration = False
    fmt: ClassVar[str]
    act_fp4: ClassVar[bool]

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(MicroscalingConfig, self.config)
        layers = list(iter_linears(model, c.include, c.exclude))
        block = BLOCK[self.fmt]
        bad = [f"{n} (in_features {lin.in_features})" for n, lin in layers if lin.in_features % block]
        if bad:
            raise ConfigError(f"{self.name}: in_features must be a multiple of {block}; exclude these linears or "
                             f"quantize them with another method: {', '.join(bad)}")
        for name, lin in layers:
            set_module(model, name, FP4Linear.from_linear(lin, self.fmt, self.act_fp4))
        self.artifacts["quantized_modules"] = len(layers)
        return model


@register
class MXFP4(_Microscaling):
    name = "mxfp4"
    fmt = "mxfp4"
    act_fp4 = False
    target = "weights"


@register
class NVFP4(_Microscaling):
    name = "nvfp4"
    fmt = "nvfp4"
    act_fp4 = False
    target = "weights"


@register
class MXFP4A4(_Microscaling):
    name = "mxfp4-a4"
    fmt = "mxfp4"
    act_fp4 = True
    target = "weights+activations"


@register
class NVFP4A4(_Microscaling):
    name = "nvfp4-a4"
    fmt = "nvfp4"
    act_fp4 = True
    target = "weights+activations"
