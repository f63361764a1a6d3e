"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 matmul with a mixed-precision outlier decomposition.

For a linear ``y = X W^T`` (X [tokens, in], W [out, in]), per forward pass:

1. outlier feature dimensions ``O = {k : max_tokens |X[:, k]| > threshold}`` (6.0 in the paper), found
   anew on every batch;
2. the outlier part ``X[:, O] W[:, O]^T`` in floating point (fp16 in the paper; float32 here);
3. the rest through vector-wise int8: each token (row of X without the O columns) gets its absmax
   scale ``c_x = max_k∉O |X[t, k]| / 127``, each output channel (row of W) its absmax scale
   ``c_w = max_k |W[n, k]| / 127``; the int8 codes are multiplied exactly in int32 by the real int8
   GEMM (:func:`quantbench.kernels.int8mm.int8_matmul`) and the product is rescaled by ``c_x c_w``;
4. ``y`` = the sum of the two parts (+ bias).

Storage (as bitsandbytes' ``Linear8bitLt`` keeps it for inference): only the int8 weight and its fp32
per-channel scales.  The outlier columns' weights are not kept in floating point: since ``O`` changes
from batch to batch, the fp part uses ``W[:, O]`` dequantized from the int8 weight (``qweight * c_w``),
as bitsandbytes does, so the bytes are exactly those of vector-wise W8A8 and the weight's int8 error
applies to the outlier part too; only the activations of the outlier dimensions escape quantization.
``threshold: inf`` (the module, not a suite: suite numbers are finite) is plain vector-wise W8A8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int8mm
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    QuantizedModule,
    Storage,
    register,
    replace_linears,
    tensor_bytes,
)


class LLMInt8Linear(QuantizedModule):
    """int8 per-channel weight; activations int8 per token except the outlier dimensions (float32)."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = 6.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold = float(threshold)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.packed = True
        #: outlier dimensions of the last forward (diagnostics)
        self.last_outlier_dims = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> LLMInt8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, linear.weight.dtype,
                device=linear.weight.device)
        q, s = int8mm.quantize_weight_per_channel(linear.weight.data)
        m.qweight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            assert m.bias is not None  # constructed with bias=True above
            m.bias.copy_(linear.bias.data)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale.unsqueeze(1)

    def storage(self) -> Storage:
        # the outlier columns are dequantized from qweight at run time: no extra bytes (module doc)
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            scales_zeros=tensor_bytes(self.weight_scale),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    def outlier_dims(self, x2d: torch.Tensor) -> torch.Tensor:
        """Bool [in]: the feature dimensions where some token's |x| exceeds the threshold."""
        return (x2d.abs() > self.threshold).any(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).float()
        out = self.outlier_dims(x2d)
        n_out = int(out.sum())
        self.last_outlier_dims = n_out
        x_int = x2d.masked_fill(out, 0.0) if n_out else x2d
        xq, xs = int8mm.quantize_per_token(x_int)
        if self.packed:
            y = int8mm.int8_matmul(xq, xs, self.qweight, self.weight_scale, None, out_dtype=torch.float32)
        else:
            y = F.linear(xq.float() * xs.unsqueeze(-1), self.dequantized_weight())
        if n_out:
            idx = out.nonzero().squeeze(1)
            w_out = self.qweight[:, idx].float() * self.weight_scale.unsqueeze(1)  # dequantized outlier columns
            y = y + x2d[:, idx] @ w_out.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}, packed={self.packed}"


@dataclass(frozen=True)
class LLMInt8Config(ModuleSelection):
    threshold: float = 6.0  # |x| above it in any token makes a feature dimension an outlier (fp path)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.threshold > 0 and not math.isnan(self.threshold)):
            raise ConfigError(f"llm-int8: threshold must be > 0, got {self.threshold}")


@register
class LLMInt8(Method):
    """LLM.int8(): vector-wise int8 W8A8 plus fp computation of the outlier feature dimensions."""

    name = "llm-int8"
    config_cls = LLMInt8Config
    target = "weights+activations"

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(LLMInt8Config, self.config)
        n = replace_linears(model, c, lambda lin: LLMInt8Linear.from_linear(lin, c.threshold).to(lin.weight.device))
        self.artifacts.update(quantized_modules=n, threshold=c.threshold)
        return model
