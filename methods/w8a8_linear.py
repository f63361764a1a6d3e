"""W8A8 linear layer: int8 per-output-channel weights, int8 activations (per token or per tensor).

Buffers:
- ``qweight`` int8 [out, in]: symmetric codes in [-127, 127];
- ``weight_scale`` fp32 [out]: per-output-channel scale (``w = qweight * weight_scale``);
- ``input_scale`` fp32 [] (``per_tensor_static`` only): the calibrated activation scale (absmax / 127);
- ``output_scale`` fp32 [] (static output quantization only, see ``quantize_output``);
- ``bias`` (optional, kept in floating point).

The packed path quantizes the activation to int8 and runs a real int8 GEMM
(:func:`quantbench.kernels.int8mm.int8_matmul`) with the per-token x per-channel rescale applied
once; the simulated path fake-quantizes activations and weights and runs a float matmul.  Both
compute the same integer products, so they agree to fp32 rounding.

``quantize_output`` fake-quantizes the layer's output as well (SmoothQuant's reference does so for
q/k/v projections, the inputs of the attention matmuls, with ``quantize_bmm_input``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int8mm
from .base import QuantizedModule, Storage, bias_dtype_name, tensor_bytes

ACT_SCHEMES = ("per_token", "per_tensor_static")


class W8A8Linear(QuantizedModule):
    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    output_scale: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        act_scheme: str = "per_token",
        quantize_output: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act_scheme not in ACT_SCHEMES:
            raise ValueError(f"act_scheme {act_scheme!r}; valid: {ACT_SCHEMES}")
        self.in_features, self.out_features = in_features, out_features
        self.act_scheme = act_scheme
        self.quantize_output = quantize_output
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        static = act_scheme == "per_tensor_static"
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device) if static else None)
        self.register_buffer("output_scale", torch.ones((), dtype=torch.float32, device=device)
                             if static and quantize_output else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.packed = True

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        act_scheme: str = "per_token",
        input_absmax: float | torch.Tensor | None = None,
        quantize_output: bool = False,
        output_absmax: float | torch.Tensor | None = None,
    ) -> W8A8Linear:
        """Quantize ``linear``'s weight per output channel; static schemes take the calibrated absmax."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, act_scheme, quantize_output,
                linear.weight.dtype, device=linear.weight.device)
        q, s = int8mm.quantize_weight_per_channel(linear.weight.data)
        m.qweight.copy_(q)
        m.weight_scale.copy_(s)
        if m.input_scale is not None:
            if input_absmax is None:
                raise ValueError("per_tensor_static needs the calibrated input absmax")
            m.input_scale.fill_(float(torch.as_tensor(input_absmax, device="cpu").clamp(min=int8mm.EPS)) / int8mm.QMAX)
        if m.output_scale is not None:
            if output_absmax is None:
                raise ValueError("static output quantization needs the calibrated output absmax")
            out_absmax = torch.as_tensor(output_absmax, device="cpu")
            m.output_scale.fill_(float(out_absmax.clamp(min=int8mm.EPS)) / int8mm.QMAX)
        if linear.bias is not None:
            assert m.bias is not None  # constructed with bias=True above
            m.bias.copy_(linear.bias.data)
        return m

    def save_spec(self) -> dict[str, Any]:
        """The constructor's arguments (:class:`~quantbench.methods.base.Saveable`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "act_scheme": self.act_scheme, "quantize_output": self.quantize_output,
                "dtype": bias_dtype_name(self.bias)}

    # -- storage ----------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale.unsqueeze(1)

    def storage(self) -> Storage:
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            scales_zeros=tensor_bytes(self.weight_scale, self.input_scale, self.output_scale),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    # -- execution --------------------------------------------------------------------
    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes [M, K] and per-row scales [M] of the activation."""
        if self.input_scale is None:
            return int8mm.quantize_per_token(x2d)
        return int8mm.quantize_per_tensor(x2d, self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = self.quantize_input(x.reshape(-1, shape[-1]))
        if self.packed:
            y = int8mm.int8_matmul(xq, xs, self.qweight, self.weight_scale, self.bias, out_dtype=torch.float32)
        else:
            x_fq = xq.float() * xs.unsqueeze(-1)
            y = F.linear(x_fq, self.dequantized_weight(), None if self.bias is None else self.bias.float())
        if self.quantize_output:
            y = int8mm.fake_quantize(y, per_token=self.act_scheme == "per_token", scale=self.output_scale)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act={self.act_scheme}, "
                f"quantize_output={self.quantize_output}, packed={self.packed}")
