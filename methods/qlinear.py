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

import torch
import torch.nn.functional as F

from quantbench.kernels.intq import pack_bits, unpack_bits
from quantbench.methods.base import QuantizedModule, Storage, tensor_bytes


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack codes packed along dim 0; shift-and-mask for 2/4/8 bits and for 3 bits (3 words per 32 codes)."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
        return codes.reshape(packed.shape[0] * per, packed.shape[1])[:n]
    if bits == 3 and packed.shape[0] % 3 == 0:
        w = packed.view(packed.shape[0] // 3, 3, packed.shape[1]).to(torch.int64) & 0xFFFFFFFF
        lo = w[:, 0] | (w[:, 1] << 32)  # codes 0..20 whole, code 21's low bit at bit 63
        hi = w[:, 2]
        j = torch.arange(21, device=packed.device).view(1, 21, 1)
        first = (lo.unsqueeze(1) >> (3 * j)) & 7
        c21 = ((lo >> 63) & 1) | ((hi & 3) << 1)
        k = torch.arange(10, device=packed.device).view(1, 10, 1)
        last = (hi.unsqueeze(1) >> (2 + 3 * k)) & 7
        codes = torch.cat([first, c21.unsqueeze(1), last], dim=1).to(torch.int32)
        return codes.reshape(-1, packed.shape[1])[:n]
    return unpack_bits(packed, bits, n, dim=0)


class IntQuantLinear(QuantizedModule):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        sym: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"{in_features}x{out_features} at {bits} bits does not pack into int32 words")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = group_size if group_size > 0 else in_features
        n_groups = -(-in_features // self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
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
        m = cls(in_f, out_f, bits, group_size, bias is not None, sym, dtype)
        m.qweight.copy_(pack_bits(codes.t().to(torch.int32), bits, dim=0))
        m.qzeros.copy_(pack_bits(zeros.t().round().to(torch.int32), bits, dim=1))
        m.scales.copy_(scales.t().to(torch.float16))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias)
        return m

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
            from quantbench.kernels.intmm import int_weight_linear

            return int_weight_linear(x, self)
        if self._sim_weight is None:
            self._sim_weight = self.dequantized_weight().to(self.compute_dtype)
        return F.linear(x, self._sim_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, packed={self.packed}"
        )
