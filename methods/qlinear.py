"""Weight-only uniform-integer linear layer in the GPTQ checkpoint layout (used by RTN and GPTQ).

Buffers, as GPTQ/GPTQModel checkpoints name them:
- ``qweight`` int32 [in * bits / 32, out]: codes packed along the input dimension;
- ``qzeros``  int32 [n_groups, out * bits / 32]: integer zero points packed along the output dimension;
- ``scales``  fp16  [n_groups, out];
- ``g_idx``   int32 [in]: the group of each input column (act-order permutes it).
Zero points are stored as they are used (``w = scale * (q - zero)``); the v1 checkpoint
convention (``zero - 1``) is applied only at export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.intmm import int_weight_linear
from ..kernels.intq import pack_bits, unpack_bits, unpack_rows
from .base import QuantizedModule, Storage, dtype_name, tensor_bytes


class IntQuantLinear(QuantizedModule):
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        sym: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"{in_features}x{out_features} at {bits} bits does not pack into int32 words")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = group_size if group_size > 0 else in_features
        n_groups = -(-in_features // self.group_size)
        self.register_buffer("qweight",
                             torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros",
                             torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype
        self.packed = True
        self._sim_weight: torch.Tensor | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        sym: bool = False,
    ) -> IntQuantLinear:
        """codes [out, in] ints; scales/zeros [out, n_groups]; g_idx [in] (default: i // group_size)."""
        out_f, in_f = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_f, out_f, bits, group_size, bias is not None, sym, dtype, device=codes.device)
        m.qweight.copy_(pack_bits(codes.t().to(torch.int32), bits, dim=0))
        m.qzeros.copy_(pack_bits(zeros.t().round().to(torch.int32), bits, dim=1))
        m.scales.copy_(scales.t().to(torch.float16))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            assert m.bias is not None  # constructed with bias=True above
            m.bias.copy_(bias)
        return m

    # -- save / load (:class:`~quantbench.methods.base.Saveable`) -----------------------
    def save_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "sym": self.sym,
                "dtype": dtype_name(self.compute_dtype)}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The state_dict; ``g_idx`` only with act-order (otherwise it is the constructor's i // group_size)."""
        sd = dict(self.state_dict())
        if not self.has_act_order():
            del sd["g_idx"]
        return sd

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = dict(tensors)
        sd.setdefault("g_idx", self.g_idx.clone())
        self.load_state_dict(sd, strict=True)

    # -- decoding -------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Integer codes [in, out]."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Integer zero points [n_groups, out]."""
        return unpack_bits(self.qzeros, self.bits, self.out_features, dim=1)

    def dequantized_weight(self) -> torch.Tensor:
        g = self.g_idx.long()
        scales = self.scales.float()[g]  # [in, out]
        zeros = self.zeros().float()[g]
        w = (self.codes().float() - zeros) * scales
        return w.t().contiguous()

    def storage(self) -> Storage:
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            # g_idx is only needed with act-order; without it, groups are implicit
            scales_zeros=tensor_bytes(self.qzeros, self.scales)
            + (tensor_bytes(self.g_idx) if self.has_act_order() else 0),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    def has_act_order(self) -> bool:
        natural = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        return not torch.equal(self.g_idx.long(), natural)

    # -- execution ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return int_weight_linear(x, self)
        if self._sim_weight is None:
            self._sim_weight = self.dequantized_weight().to(self.compute_dtype)
        return F.linear(x, self._sim_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, packed={self.packed}"
        )
