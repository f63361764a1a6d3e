"""FP8 E4M3 (``torch.float8_e4m3fn``): scaled quantization, dequantization and the scaled FP8 GEMM.

The format (the E4M3 encoding of the OCP 8-bit floating point specification, "fn": finite, NaN only):
1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits.  There are no infinities: only S.1111.111 is
NaN, so the largest magnitude is S.1111.110 = 1.75 * 2^8 = 448.  Normal values reach down to
2^-6 = 0.015625; below it the subnormals ``m * 2^-9`` (m = 1..7), the smallest 2^-9 = 0.001953125.
Every binade holds 8 values, so the spacing is 2^-3 of the binade's base (a relative step of 1/8 to 1/16).

A tensor is stored as codes ``q = e4m3(x / scale)`` and an fp32 ``scale = amax / 448`` over a reduced
dimension (per output channel of a weight, per token of an activation) or over the whole tensor, so the
largest magnitude of each slice maps to 448 and ``x ~ q * scale``.

- :func:`cast_e4m3`: clamp to [-448, 448], then torch's cast (round to nearest, ties to even).  The clamp
  makes out-of-range values saturate to +-448 on every device, whatever the device's own cast does with
  overflow (the format has no infinity; an unsaturated overflow would be NaN).  NaN stays NaN.
- :func:`quantize_e4m3` / :func:`dequantize_e4m3` / :func:`fake_quantize_e4m3`: dynamic absmax scaling.
- :func:`fp8_matmul_reference` is the ground truth of ``y = (xq * x_scale) @ (wq * w_scale)^T + bias``:
  a product of two E4M3 values has at most 8 significant bits, lies on the grid of 2^-18 and below 2^18,
  so the float64 sums of the products are exact (for K up to 2^17) and the row x column rescale is
  applied once to them.
- :func:`fp8_matmul_scaled_mm` is the real FP8 GEMM, ``torch._scaled_mm`` with row-wise scales (an
  [M, 1] activation scale, a [1, N] weight scale).  On CPU it accumulates in fp32 with an fp32 output
  (torch ships a CPU implementation; :func:`cpu_has_scaled_mm` checks the running build).  On CUDA it
  needs compute capability >= 8.9 (Ada, Hopper and later), K and N multiples of 16 and the weight as the
  column-major view ``wq.t()``; its row-wise output is bf16 (the dtype every torch version accepts for
  row-wise scales), and the bias is added in fp32 after it.
- :func:`fp8_matmul` dispatches: the scaled GEMM where the device supports it, else the reference.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
#: the largest finite E4M3 magnitude (1.75 * 2^8)
E4M3_MAX = 448.0
#: the smallest positive (subnormal) E4M3 value
E4M3_MIN_SUBNORMAL = 2.0**-9
#: the smallest absmax used for a scale, so all-zero slices get a finite, normal fp32 scale
AMAX_EPS = 1e-12
#: run ``torch._scaled_mm`` where the device supports it (False: always the reference)
USE_SCALED_MM = True
#: ``torch._scaled_mm`` on CUDA: the compute capability with FP8 tensor cores and the K, N alignment
CUDA_MIN_CAPABILITY = (8, 9)
CUDA_ALIGN = 16


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` (already scaled) to E4M3: saturate to [-448, 448], then round to nearest even."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _expand(scale: torch.Tensor, dim: int | None) -> torch.Tensor:
    return scale if dim is None or scale.dim() == 0 else scale.unsqueeze(dim)


def quantize_e4m3(x: torch.Tensor, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes (``x``'s shape) and fp32 scales ``amax / 448`` over ``dim`` (the shape of ``x`` without
    ``dim``), or one scalar scale over the whole tensor when ``dim`` is None."""
    x = x.float()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
    scale = amax.clamp(min=AMAX_EPS) / E4M3_MAX
    return cast_e4m3(x / _expand(scale, dim)), scale


def dequantize_e4m3(q: torch.Tensor, scale: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """fp32 ``q * scale``, the scale broadcast along ``dim`` (a scalar scale multiplies everything)."""
    return q.float() * _expand(scale.float(), dim)


def fake_quantize_e4m3(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Quantize-dequantize ``x`` (dynamic absmax scales over ``dim``), in ``x``'s dtype."""
    q, s = quantize_e4m3(x, dim)
    return dequantize_e4m3(q, s, dim).to(x.dtype)


def _row_scales(x_scale: torch.Tensor, w_scale: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation scale as [M, 1] and the weight scale as [1, N], fp32 and contiguous (a scalar of
    either, per-tensor scaling, is repeated)."""
    sa = x_scale.float().reshape(-1).expand(m).reshape(m, 1).contiguous()
    sb = w_scale.float().reshape(-1).expand(n).reshape(1, n).contiguous()
    return sa, sb


def fp8_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ground truth: exact sums of the E4M3 products (float64), one per-row x per-column rescale.

    ``xq`` [M, K] and ``wq`` [N, K] E4M3; ``x_scale`` [M] or []; ``w_scale`` [N] or []."""
    sa, sb = _row_scales(x_scale, w_scale, xq.shape[0], wq.shape[0])
    y = (xq.double() @ wq.double().t()) * sa.double() * sb.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def fp8_matmul_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch._scaled_mm`` with row-wise scales: fp32 output on CPU, bf16 on CUDA; bias added in fp32."""
    sa, sb = _row_scales(x_scale, w_scale, xq.shape[0], wq.shape[0])
    mm_dtype = torch.bfloat16 if xq.is_cuda else torch.float32
    y = torch._scaled_mm(xq.contiguous(), wq.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=mm_dtype)
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@functools.cache
def cpu_has_scaled_mm() -> bool:
    """Whether this torch build runs ``torch._scaled_mm`` on E4M3 CPU tensors with row-wise scales."""
    a = torch.ones(2, 16, dtype=E4M3, device="cpu")
    try:
        y = torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1, device="cpu"), scale_b=torch.ones(1, 2, device="cpu"),
                             out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        log.debug("torch._scaled_mm is not available on CPU (%s): FP8 reference path", e)
        return False
    return bool((y == 16).all())


def cuda_supports_scaled_mm(device: torch.device) -> bool:
    """An NVIDIA device with FP8 tensor cores (compute capability >= 8.9); ROCm's FP8 is another format."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= CUDA_MIN_CAPABILITY)


def scaled_mm_supported(device: torch.device, k: int, n: int) -> bool:
    """Whether ``torch._scaled_mm`` runs a [M, K] x [K, N] FP8 GEMM on ``device`` (switched on, the device has
    it, and on CUDA K and N aligned)."""
    if not USE_SCALED_MM:
        return False
    if device.type == "cpu":
        return cpu_has_scaled_mm()
    if not cuda_supports_scaled_mm(device):
        return False
    if k % CUDA_ALIGN or n % CUDA_ALIGN:
        log.debug("_scaled_mm on CUDA needs K, N multiples of %d (got %d, %d): reference path", CUDA_ALIGN, k, n)
        return False
    return True


def scaled_mm_applies(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether :func:`fp8_matmul` runs ``torch._scaled_mm`` for these operands."""
    return xq.shape[0] != 0 and scaled_mm_supported(xq.device, xq.shape[1], wq.shape[0])


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The FP8 W8A8 GEMM: ``torch._scaled_mm`` where the device supports it, else the reference."""
    if scaled_mm_applies(xq, wq):
        return fp8_matmul_scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    return fp8_matmul_reference(xq, x_scale, wq, w_scale, bias, out_dtype)
