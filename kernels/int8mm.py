"""W8A8 matmul: int8 activations x int8 weights -> int32, rescaled once by per-row x per-column scales.

``y[m, n] = x_scale[m] * w_scale[n] * sum_k xq[m, k] * wq[n, k] + bias[n]``

- :func:`quantize_per_token` / :func:`quantize_per_tensor`: symmetric int8 activation quantization
  (codes in [-127, 127], as SmoothQuant's reference), dynamic per token or with a static scale.
- :func:`int8_matmul_reference` is the ground truth: the integer products summed exactly in float64
  (exact below 2^53), then rescaled in fp32.
- :func:`int8_matmul_intmm` is the CPU fast path: ``torch._int_mm`` (int8 x int8 -> int32, exact).
  On CPU it accepts any M >= 1, any K and N, and the weight as a transposed view ``wq.t()``.
  On CUDA ``_int_mm`` needs ``M > 16`` and K, N multiples of 8: rows are zero-padded to 17 there
  (and shapes it rejects fall back to the reference); :mod:`quantbench.kernels.triton_int8` is the
  CUDA kernel with the rescale fused into its epilogue.
- :func:`int8_matmul` dispatches: Triton on CUDA when available, else ``_int_mm``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

QMAX = 127
#: smallest activation absmax used for a scale (as the reference clamps), so all-zero rows stay finite
EPS = 1e-5
#: use the Triton kernel on CUDA tensors when triton imports
USE_TRITON_ON_CUDA = True


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) symmetric int8: codes [M, K] int8 and scales [M] fp32."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=EPS) / QMAX
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor symmetric int8 with a calibrated ``scale`` (absmax / 127): codes and scales [M]."""
    x = x.float()
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    q = torch.round(x / s).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, s.expand(x.shape[:-1]).contiguous()


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: codes [N, K] int8 and scales [N] fp32."""
    return quantize_per_token(w)


def fake_quantize(x: torch.Tensor, per_token: bool = True, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (per token, or per tensor with ``scale``, dynamic when it is None)."""
    if per_token:
        q, s = quantize_per_token(x)
    else:
        q, s = quantize_per_tensor(x, x.abs().amax().clamp(min=EPS) / QMAX if scale is None else scale)
    return (q.float() * s.unsqueeze(-1)).to(x.dtype)


def _rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    y = acc.float() * x_scale.float().unsqueeze(-1) * w_scale.float().unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ground truth: exact integer products (float64), one rescale. xq [M, K], wq [N, K]."""
    acc = xq.double() @ wq.double().t()
    return _rescale(acc, x_scale, w_scale, bias, out_dtype)


def int8_matmul_intmm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch._int_mm`` (int32 accumulation) then one rescale; pads M to 17 on CUDA."""
    M = xq.shape[0]
    a = xq.contiguous()
    if xq.is_cuda:
        K, N = xq.shape[1], wq.shape[0]
        if K % 8 or N % 8:
            log.debug("_int_mm on CUDA needs K, N multiples of 8 (got %d, %d): reference path", K, N)
            return int8_matmul_reference(xq, x_scale, wq, w_scale, bias, out_dtype)
        if M <= 16:
            a = torch.cat([a, a.new_zeros(17 - M, K)])
    acc = torch._int_mm(a, wq.t())[:M]
    return _rescale(acc, x_scale, w_scale, bias, out_dtype)


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The packed W8A8 GEMM: Triton (fused epilogue) on CUDA, ``torch._int_mm`` elsewhere."""
    if xq.is_cuda and USE_TRITON_ON_CUDA:
        try:
            from .triton_int8 import int8_matmul_triton  # deferred: triton is optional
        except ImportError:  # pragma: no cover - triton missing
            pass
        else:
            return int8_matmul_triton(xq, x_scale, wq, w_scale, bias, out_dtype)
    return int8_matmul_intmm(xq, x_scale, wq, w_scale, bias, out_dtype)
