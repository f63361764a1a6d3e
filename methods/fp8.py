"""FP8 (E4M3) weights with per-output-channel scales, and per-token dynamic FP8 activations.

The "FP8 dynamic" scheme served by inference engines for Hopper/Ada GPUs: no calibration, every weight
row ``w`` stored as E4M3 codes ``q = e4m3(w / s)`` with one fp32 scale ``s = max|w| / 448`` (or one
scale for the whole matrix, ``weight_scale: tensor``), and at run time every token's activation row
quantized the same way with its own scale, then one FP8 GEMM rescaled per token x per channel.  The
format and its ops are :mod:`quantbench.kernels.fp8` (saturating round-to-nearest-even cast).

Two names, so that each states what it quantizes (``Method.target``):

- ``fp8``: W8A8, weights and activations (``activations: dynamic``); target "weights+activations".
- ``fp8-weight``: weights only (``activations: none``): the layer dequantizes its weight to the
  activation dtype and runs a dense matmul (as a W8A16 kernel does); target "weights".

Storage (:class:`FP8Linear`): the weight as a real ``float8_e4m3fn`` buffer (1 byte per weight), the fp32
scales (4 bytes per output channel, or 4 per matrix) and the bias as it was: ``8 + 32 / in_features``
bits per weight with channel scales.

Execution: with ``packed`` (the default) the activation is quantized per token and
:func:`~quantbench.kernels.fp8.fp8_matmul` runs ``torch._scaled_mm`` (on CPU where the torch build has
it, on CUDA with compute capability >= 8.9), else the exact reference; ``packed = False`` is the
simulated path (activation quantize-dequantize, dequantized weight, fp32 ``F.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fp8 as fp8k
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    QuantizedModule,
    Storage,
    bias_dtype_name,
    check_choice,
    register,
    replace_linears,
    tensor_bytes,
)

ACTIVATIONS = ("dynamic", "none")
WEIGHT_SCALES = ("channel", "tensor")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FP8Config(ModuleSelection):
    """``fp8``: ``activations`` "dynamic" (per-token scales); ``weight_scale`` "channel" or "tensor"."""

    method_name: ClassVar[str] = "fp8"
    #: whether the method named ``method_name`` quantizes activations (its ``target``)
    quantizes_activations: ClassVar[bool] = True

    activations: Literal["dynamic", "none"] = "dynamic"
    weight_scale: Literal["channel", "tensor"] = "channel"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.method_name, "activations", self.activations, ACTIVATIONS)
        check_choice(self.method_name, "weight_scale", self.weight_scale, WEIGHT_SCALES)
        if self.quantizes_activations and self.activations == "none":
            raise ConfigError(f"{self.method_name}: activations='none' is weight-only FP8: use the method "
                              f"'{FP8WeightConfig.method_name}' ({self.method_name} quantizes weights+activations)")
        if not self.quantizes_activations and self.activations != "none":
            raise ConfigError(f"{self.method_name}: activations={self.activations!r} quantizes activations: use "
                              f"the method '{FP8Config.method_name}' ({self.method_name} quantizes weights only)")


@dataclass(frozen=True)
class FP8WeightConfig(FP8Config):
    """``fp8-weight``: the same weights, activations left in floating point (``activations`` "none")."""

    method_name: ClassVar[str] = "fp8-weight"
    quantizes_activations: ClassVar[bool] = False

    activations: Literal["dynamic", "none"] = "none"


# --------------------------------------------------------------------------- quantized module


class FP8Linear(QuantizedModule):
    """``nn.Linear`` over an E4M3 weight with fp32 scales; activations per-token FP8 or left as they are.

    Buffers: ``qweight`` float8_e4m3fn [out, in]; ``weight_scale`` fp32 [out] (``channel``) or []
    (``tensor``); ``bias`` (optional) in the linear's dtype.  ``w = qweight * weight_scale``.
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activations: str = "dynamic",
                 weight_scale: str = "channel", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations {activations!r}; valid: {ACTIVATIONS}")
        if weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"weight_scale {weight_scale!r}; valid: {WEIGHT_SCALES}")
        self.in_features, self.out_features = in_features, out_features
        self.activations, self.weight_scale_kind = activations, weight_scale
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=fp8k.E4M3, device=device))
        scale_shape = (out_features,) if weight_scale == "channel" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.packed = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "dynamic", weight_scale: str = "channel") -> FP8Linear:
        """Quantize ``linear``'s weight (scales ``amax / 448`` per output row, or over the matrix)."""
        w = linear.weight.data
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activations, weight_scale, w.dtype,
                device=w.device)
        q, s = fp8k.quantize_e4m3(w, dim=1 if weight_scale == "channel" else None)
        m.qweight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            assert m.bias is not None  # constructed with bias=True above
            m.bias.copy_(linear.bias.data)
        return m

    def save_spec(self) -> dict[str, object]:
        """The constructor's arguments (:class:`~quantbench.methods.base.Saveable`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "activations": self.activations, "weight_scale": self.weight_scale_kind,
                "dtype": bias_dtype_name(self.bias)}

    # -- storage ----------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        return fp8k.dequantize_e4m3(self.qweight, self.weight_scale, dim=1)

    def storage(self) -> Storage:
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            scales_zeros=tensor_bytes(self.weight_scale),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    # -- execution --------------------------------------------------------------------
    def kernel_path(self, device: torch.device) -> str:
        """Native where the scaled FP8 GEMM runs (W8A8, packed, ``torch._scaled_mm`` on this device); weight-only
        FP8 dequantizes to the activation dtype, and a device without the GEMM takes the float64 reference."""
        if self.activations == "none" or not self.packed:
            return "reference"
        return "native" if fp8k.scaled_mm_supported(device, self.in_features, self.out_features) else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if self.activations == "none":  # weight-only: dequantize to the activation dtype, dense matmul
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2d, self.dequantized_weight().to(x.dtype), bias)
        else:
            xq, xs = fp8k.quantize_e4m3(x2d, dim=-1)
            if self.packed:
                y = fp8k.fp8_matmul(xq, xs, self.qweight, self.weight_scale, self.bias, out_dtype=torch.float32)
            else:
                y = F.linear(fp8k.dequantize_e4m3(xq, xs, dim=-1), self.dequantized_weight(),
                             None if self.bias is None else self.bias.float())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, activations={self.activations}, "
                f"weight_scale={self.weight_scale_kind}, packed={self.packed}")


# --------------------------------------------------------------------------- methods


@register
class FP8(Method):
    """FP8 dynamic W8A8: E4M3 weights (per-channel scales) and per-token dynamic E4M3 activations."""

    name = "fp8"
    config_cls = FP8Config
    target = "weights+activations"

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(FP8Config, self.config)
        self.artifacts["quantized_modules"] = replace_linears(
            model, c, lambda lin: FP8Linear.from_linear(lin, c.activations, c.weight_scale))
        return model


@register
class FP8Weight(FP8):
    """FP8 weight-only: E4M3 weights, activations left in floating point."""

    name = "fp8-weight"
    config_cls = FP8WeightConfig
    target = "weights"
