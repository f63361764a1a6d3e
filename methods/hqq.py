"""HQQ: Half-Quadratic Quantization of weights (Badri & Shaji, 2023), calibration-free.

Each output row is quantized per group of ``group_size`` input columns on a uniform grid
``w_hat = s * (q - z)``, ``q = clamp(round(w / s + z), 0, 2^bits - 1)``.  The grid starts from the
asymmetric min-max one of ``rtn`` (fp16 scale, integer zero), then the zero point -- a float -- is
optimized (the scale too with ``opt_scale``) to minimize the sparsity-promoting l_p error
``sum |w - w_hat|^p`` (``p < 1``) by half-quadratic splitting: with an auxiliary error ``W_e`` and a
penalty weight ``beta``, alternate

1. ``W_e = shrink_lp(w - w_hat, beta)``, the generalized soft-thresholding
   ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (large errors are kept as "outliers" in ``W_e``);
2. ``z = mean_group(q - (w - W_e) / s)``, the closed-form least-squares zero for fixed codes
   (with ``opt_scale``: the least-squares line ``w - W_e ~ s q - s z`` gives both ``s`` and ``z``);

then ``q`` is re-rounded and ``beta <- kappa * beta``.  Every iterate is scored by its l_p error in
the stored precision (fp16 scale and zero); each group keeps its best (so it is never worse than the
min-max init), and the loop stops when the layer's total error stops decreasing.  Paper defaults:
``p = 0.7``, ``beta = 10``, ``kappa = 1.01``, 20 iterations.

Storage (:class:`HQQLinear`): packed codes plus one fp16 scale and one fp16 zero per group, i.e.
``bits + 32 / group_size`` bits per weight; it runs on torch's CPU int4pack op, whose ``(s, z)`` pairs
take a float zero as is (:mod:`~quantbench.kernels.hqq`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..kernels import intmm
from ..kernels.hqq import convert_hqq_int4pack, hqq_dequantize, hqq_int4pack_group, hqq_int4pack_mm
from ..kernels.intmm import Int4Pack
from ..kernels.intq import grid_params, pack_bits, unpack_rows
from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    QuantizedModule,
    Storage,
    dtype_name,
    iter_linears,
    register,
    set_module,
    tensor_bytes,
)


@dataclass(frozen=True)
class HQQConfig(ModuleSelection):
    bits: int = 4
    group_size: int = 64
    p: float = 0.7  # the l_p "norm" of the weight error, 0 < p <= 1
    iters: int = 20
    beta: float = 10.0  # initial half-quadratic penalty
    kappa: float = 1.01  # beta grows by this factor each iteration
    opt_scale: bool = False  # the paper optimizes the zero only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"hqq: bits must be 2, 3 or 4, got {self.bits}")
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"hqq: group_size must be in 1..{1 << 20} or -1 (per channel), got {self.group_size}")
        if not (math.isfinite(self.p) and 0 < self.p <= 1):
            raise ConfigError(f"hqq: p must be in (0, 1], got {self.p}")
        if not 0 <= self.iters <= 10_000:
            raise ConfigError(f"hqq: iters must be in 0..10000, got {self.iters}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"hqq: beta must be a positive number, got {self.beta}")
        if not (math.isfinite(self.kappa) and 1 <= self.kappa <= 10):
            raise ConfigError(f"hqq: kappa must be in [1, 10], got {self.kappa}")


# --------------------------------------------------------------------------- the solver


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (0 where x is 0)."""
    ax = x.abs()
    nz = ax > 0
    thr = torch.where(nz, ax, torch.ones_like(ax)).pow(p - 1) / beta
    return torch.where(nz, torch.sign(x) * F.relu(ax - thr), torch.zeros_like(x))


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float) -> float:
    """Mean ``|w - w_hat|^p`` over the elements."""
    return float((w.float() - w_hat.float()).abs().pow(p).mean())


@dataclass
class HQQWeight:
    """A quantized weight: codes [out, in] int32, fp16-valued scales and float zeros [out, n_groups] (fp32)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    lp_init: float  # mean |w - w_hat|^p of the min-max init (rtn's grid)
    lp_final: float
    iters_run: int


def hqq_quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    p: float = 0.7,
    iters: int = 20,
    beta: float = 10.0,
    kappa: float = 1.01,
    opt_scale: bool = False,
) -> HQQWeight:
    """Quantize a weight [out, in] per group of input columns by the half-quadratic l_p solver."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    n_groups = -(-in_f // gs)
    maxq = 2**bits - 1
    w = w.detach().float()
    pad = n_groups * gs - in_f
    # a short last group is padded with copies of its last column (min and max unchanged) and masked out
    wg = (torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1) if pad else w).reshape(out_f, n_groups, gs)
    valid = (torch.arange(n_groups * gs, device=w.device) < in_f).float().reshape(1, n_groups, gs)
    count = valid.sum(-1, keepdim=True)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * valid).sum(-1, keepdim=True) / count

    def score(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(wg / s + z), 0, maxq)
        return q, ((wg - s * (q - z)).abs().pow(p) * valid).sum(-1, keepdim=True)

    # the min-max init of rtn: fp16 scale rounded up, integer zero
    s0, z0 = grid_params(wg.amin(-1), wg.amax(-1), bits, sym=False, scale_dtype=torch.float16)
    s, z = s0.unsqueeze(-1), z0.unsqueeze(-1)
    q, err = score(s, z)
    best_s, best_z, best_q, best_err = s, z, q, err
    init_total = prev_total = float(err.sum())
    b, iters_run = beta, 0
    for _ in range(iters):
        iters_run += 1
        target = wg - shrink_lp(wg - s * (q - z), b, p)  # w - W_e
        if opt_scale:  # least-squares line target ~ s q + c over the group, z = -c / s
            qm, tm = mean(q), mean(target)
            cov, var = mean((q - qm) * (target - tm)), mean((q - qm) ** 2)
            ok = (var > 0) & (cov > 0)
            s_new = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s)
            s = s_new.clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16).float()
            z = qm - tm / s
        else:
            z = mean(q - target / s)
        z = z.to(torch.float16).float()  # scored as stored
        b *= kappa
        q, err = score(s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better, z, best_z)
        best_s = torch.where(better, s, best_s)
        best_q = torch.where(better, q, best_q)
        total = float(err.sum())
        if total >= prev_total:  # the error stopped decreasing
            break
        prev_total = total
    n = out_f * in_f
    codes = best_q.reshape(out_f, n_groups * gs)[:, :in_f].to(torch.int32)
    lp_final = float(best_err.sum()) / n
    return HQQWeight(codes, best_s.squeeze(-1), best_z.squeeze(-1), init_total / n, lp_final, iters_run)


# --------------------------------------------------------------------------- the quantized module


class HQQLinear(QuantizedModule):
    """Weight-only linear in HQQ's layout (:mod:`~quantbench.kernels.hqq`): packed codes, fp16 scale and zero."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (in_features * bits) % 32:
            raise ValueError(f"hqq: {in_features} input columns at {bits} bits do not pack into int32 words")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if group_size > 0 else in_features
        n_groups = -(-in_features // self.group_size)
        self.register_buffer("qweight",
                             torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype
        self.packed = True
        self._sim_weight: torch.Tensor | None = None
        self._int4pack: tuple[tuple[int, int, int], Int4Pack | None] | None = None

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
        bias: torch.Tensor | None = None,
    ) -> HQQLinear:
        """codes [out, in] in [0, 2^bits); scales and float zeros [out, n_groups]."""
        out_f, in_f = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(in_f, out_f, bits, group_size, bias is not None, dtype, device=codes.device)
        m.qweight.copy_(pack_bits(codes.t().to(torch.int32), bits, dim=0))
        m.scales.copy_(scales.t().to(torch.float16))
        m.zeros.copy_(zeros.t().to(torch.float16))
        if bias is not None:
            assert m.bias is not None  # constructed with bias=True above
            m.bias.copy_(bias)
        return m

    def save_spec(self) -> dict[str, object]:
        """The constructor's arguments (:class:`~quantbench.methods.base.Saveable`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "dtype": dtype_name(self.compute_dtype)}

    def codes(self) -> torch.Tensor:
        """Integer codes [in, out]."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return hqq_dequantize(self.qweight, self.scales, self.zeros, self.bits, self.in_features, self.group_size)

    def storage(self) -> Storage:
        return Storage(
            packed_weights=tensor_bytes(self.qweight),
            scales_zeros=tensor_bytes(self.scales, self.zeros),
            unquantized=tensor_bytes(self.bias),
            quantized_weights=self.in_features * self.out_features,
        )

    def int4pack(self) -> Int4Pack | None:
        """The CPU op's converted weight, built on first use and rebuilt when a buffer changes (None: unsupported)."""
        versions = (self.qweight._version, self.scales._version, self.zeros._version)
        if self._int4pack is None or self._int4pack[0] != versions:
            ok = hqq_int4pack_group(self.in_features, self.out_features, self.bits, self.group_size) is not None
            pack = (convert_hqq_int4pack(self.qweight, self.scales, self.zeros, self.bits, self.in_features,
                                         self.group_size) if ok else None)
            self._int4pack = (versions, pack)
        return self._int4pack[1]

    def _fast_pack(self, device: torch.device) -> Int4Pack | None:
        """The int4pack weight when the forward on ``device`` takes the CPU int4pack GEMM, else None."""
        return self.int4pack() if intmm.CPU_FAST_PATH and device.type == "cpu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.packed:
            if (pack := self._fast_pack(x.device)) is not None:
                return hqq_int4pack_mm(x, pack, self.out_features, self.bias)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if self._sim_weight is None:
            self._sim_weight = self.dequantized_weight().to(self.compute_dtype)
        return F.linear(x, self._sim_weight.to(x.dtype), bias)

    def kernel_path(self, device: torch.device) -> str:
        """Native where the forward takes the int4pack GEMM (CPU fast path), else a dense dequantized weight."""
        return "native" if self.packed and self._fast_pack(device) is not None else "reference"

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, packed={self.packed}"
        )


# --------------------------------------------------------------------------- the method


@register
class HQQ(Method):
    """Half-Quadratic Quantization: per-group zero points optimized for an l_p weight error (no calibration)."""

    name = "hqq"
    config_cls = HQQConfig
    needs_calibration = False

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(HQQConfig, self.config)
        layers = list(iter_linears(model, c.include, c.exclude))
        lp_init = lp_final = 0.0
        for name, lin in tqdm(layers, desc="hqq", leave=False, disable=None):
            r = hqq_quantize_weight(lin.weight.data, c.bits, c.group_size, c.p, c.iters, c.beta, c.kappa, c.opt_scale)
            q = HQQLinear.from_codes(
                r.codes, r.scales, r.zeros, c.bits, c.group_size,
                bias=None if lin.bias is None else lin.bias.data.clone(),
            )
            set_module(model, name, q)
            lp_init, lp_final = lp_init + r.lp_init, lp_final + r.lp_final
        self.artifacts["quantized_modules"] = len(layers)
        if layers:  # mean over layers of mean |w - w_hat|^p: the min-max init (rtn's grid) and hqq's
            self.artifacts["lp_error_init"] = lp_init / len(layers)
            self.artifacts["lp_error"] = lp_final / len(layers)
        return model
