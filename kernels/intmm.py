"""Matmul over int-packed weights (GPTQ layout): dispatch between the reference and fast paths.

``reference_linear`` is the ground truth: unpack codes, dequantize with the fp16 group
scales and integer zeros, and run a dense matmul.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from quantbench.methods.qlinear import IntQuantLinear


def reference_linear(x: torch.Tensor, layer: IntQuantLinear) -> torch.Tensor:
    w = layer.dequantized_weight().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


def int_weight_linear(x: torch.Tensor, layer: IntQuantLinear) -> torch.Tensor:
    """Packed-path forward for :class:`IntQuantLinear`."""
    return reference_linear(x, layer)
