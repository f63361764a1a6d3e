"""OBQ (Frantar & Alistarh, 2022, "Optimal Brain Compression", NeurIPS): exact greedy OBS quantization.

Per output row ``w`` (the layer-wise objective ||W X - Ŵ X||² separates over rows, all rows share
``H = 2 X X^T / n``), with ``F`` the not-yet-quantized weights of the row and ``H_F^-1`` the inverse
Hessian restricted to them, repeat ``d_col`` times:

1. pick ``q = argmin_{q in F} (w_q - quant(w_q))^2 / [H_F^-1]_qq`` (the weight whose quantization
   increases the squared error least);
2. quantize it and update the rest of the row by the OBS step
   ``δ_F = -(w_q - quant(w_q)) / [H_F^-1]_qq · (H_F^-1)_{:,q}``;
3. remove ``q`` from the inverse by one step of Gaussian elimination,
   ``H^-1 <- H^-1 - H^-1_{:,q} H^-1_{q,:} / [H^-1]_qq`` (row and column ``q`` become zero).

Exact and ``O(d_col^3)`` per row; rows are processed ``batch_rows`` at a time with a private copy of
``H^-1`` each ([batch, d_col, d_col]), as the paper's implementation batches them.

Shared with GPTQ so the two compare layer for layer: the Hessian (``GPTQ._accumulate_hessians``) and
its dead-input handling and dampening (``prepare_hessian``, ``percdamp``), the asymmetric (or
symmetric) min-max grid with fp16-rounded scales (``find_params``), the per-weight loss definition
``(w - q)^2 / (2 [H_F^-1]_qq)`` (GPTQ's ``losses``: both sum to ``(w - ŵ) H (w - ŵ)^T / 2`` per row,
up to rounding), the block-sequential wiring (block inputs captured, true-sequential groups, outputs of
the quantized block feed the next) and the packed storage (``IntQuantLinear.from_codes``).

The grid is fitted on the original row before any update (the paper's per-channel setting,
``group_size: -1``, the default).  With groups, each group's grid is likewise fitted on the group's
original weights (GPTQ's ``static_groups``): OBQ visits weights in a data-dependent order, so there
is no "first column of the group" whose updated values a grid could be fitted on.
``outliers_first`` (default on, as the paper's reference implementation does): when updates have
pushed some remaining weights of a row off the grid (rounding error above half a grid step, i.e.
(w - quant(w))^2 > scale^2 / 4), the one with the largest error is quantized next instead of the
greedy choice, while others are still there to absorb its error.  ``outliers_first: false`` is the
plain greedy rule of steps 1-3.  (The reference's extra condition on exact-zero weights belongs to its
pruning-then-quantization path and is not reproduced.)

Checked against the paper's reference implementation (IST-DASLab/OBC, ``trueobs.py``
``TrueOBS.quantize`` and ``quant.Quantizer``): same greedy score ``err / [H_F^-1]_qq``, same outlier rule
(``err > scale^2 / 4`` -> argmax err), same OBS row update and rank-1 elimination, same per-weight loss
``err / diag / 2``, same dead-column rule (``H_ii = 1``, column zeroed), same min-max grid (range widened to
include 0, fitted once on the original rows, asymmetric zero ``round(-min / scale)``, symmetric zero
``(maxq + 1) / 2``).  Differences: the reference adds no dampening (here ``percdamp``, shared with GPTQ;
measured on 32 rows of the k_proj below: 0.0473 with none vs 0.0479 with 1%, GPTQ 0.0147 vs 0.0169) and keeps
its scales in fp32 (here rounded to fp16, the packed storage's).  The solver equals a brute-force
transcription of the loop (``tests/methods/test_obq.py``).

Greedy is not uniformly better than GPTQ's act-order: on random layers with moderately correlated
inputs OBQ's loss is 0.84-0.99x GPTQ's (``tests/methods/test_obq.py``), but on LLM layers it loses, and
the cause is the order, not a bug or the precision.  A few input features are much larger than the rest
(smollm2-135m block 0 k_proj: diag H median 7.3e-4, max 0.64, 39 of 576 columns above 10x the median);
``[H_F^-1]_qq`` is tiny for their columns, so they score worst and are quantized last (mean step 445 of
576) with little left to absorb their error; overall OBQ's order correlates 0.60 with ascending diag H,
i.e. it is close to *reverse* act-order, whereas act-order quantizes those columns first.  Measured
(float64 solve, block 0 of smollm2-135m, 32 x 512 wiki calibration tokens, fp block inputs, per-channel
grids, 4 bits unless said; ``/tmp`` script over ``obq_quantize``/``gptq_quantize``/``rtn_quantize_weight``, same loss)::

    layer (rows used)   OBQ     OBQ w/o outlier rule  GPTQ act-order  GPTQ natural  RTN
    k_proj (192)        0.474   0.470                 0.159           0.231         0.937
    k_proj (192) 3 bit  2.278   2.346                 0.757           1.099         4.179

k_proj, first 32 rows: GPTQ with reverse act-order (ascending diag H) 0.0539 vs OBQ 0.0479 vs act-order
0.0169; with the 39 outlier columns removed OBQ 0.0107 vs GPTQ act-order 0.0082 vs natural 0.0100 (the
remaining columns still spread over ~10x in diag H, so the order effect persists, smaller).  A synthetic
test pins the mechanism (4 features x30: OBQ within 10% of reverse act-order, > 1.3x act-order).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from ..kernels.intq import quantize_codes
from .base import Calibration, ConfigError, Method, ModuleSelection, check_choice, iter_linears, register, set_module
from .gptq import GPTQ, block_output, capture_block_inputs, sequential_groups, transformer_blocks
from .gptq_solver import find_params, prepare_hessian
from .qlinear import IntQuantLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OBQConfig(ModuleSelection):
    bits: int = 4
    group_size: int = -1  # -1: one grid per output channel (the paper); >0: static per-group grids
    sym: bool = False
    percdamp: float = 0.01
    batch_rows: int = 32  # rows solved together (memory: batch_rows * d_col^2 * 4 bytes)
    outliers_first: bool = True  # the OBC reference's rule for weights pushed off the grid (module doc)
    true_sequential: bool = True
    max_layers: int = -1  # quantize only the first N selected linears (in block order); -1: all
    device: str = "auto"  # where the per-row solve runs: "auto" (CUDA when available), "cpu", "cuda"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("obq", "bits", self.bits, (2, 3, 4, 8))
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"obq: group_size must be in 1..{1 << 20} or -1 (per channel), got {self.group_size}")
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"obq: percdamp must be in [0, 1), got {self.percdamp}")
        if not 0 < self.batch_rows <= 1 << 16:
            raise ConfigError(f"obq: batch_rows must be in 1..{1 << 16}, got {self.batch_rows}")
        check_choice("obq", "device", self.device, ("auto", "cpu", "cuda"))
        if self.max_layers != -1 and self.max_layers < 1:
            raise ConfigError(f"obq: max_layers must be >= 1 or -1 (all), got {self.max_layers}")


@dataclass
class OBQResult:
    """Codes and grid of a quantized layer (natural column order, ``g_idx = i // group_size``)."""

    codes: torch.Tensor  # int32 [rows, columns]
    scales: torch.Tensor  # fp32 (fp16-representable) [rows, n_groups]
    zeros: torch.Tensor  # integer-valued fp32 [rows, n_groups]
    Q: torch.Tensor  # dequantized weight [rows, columns]
    losses: torch.Tensor  # [rows, columns]: (w_q - quant(w_q))^2 / (2 [H_F^-1]_qq) when q was quantized
    order: torch.Tensor  # int64 [rows, columns]: the column quantized at each step, per row


def obq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = -1,
    sym: bool = False,
    percdamp: float = 0.01,
    batch_rows: int = 32,
    outliers_first: bool = True,
    dtype: torch.dtype = torch.float32,
) -> OBQResult:
    """Quantize ``W`` [rows, columns] against ``H`` [columns, columns] by OBQ's greedy loop (module doc).

    ``dtype`` is the precision of the solve (float64 for exactness tests); grids are fitted in fp32.
    The loop runs on ``W``'s device (``device`` of the method moves it to CUDA); results come back on CPU.
    """
    rows, columns = W.shape
    dev = W.device
    H, W = prepare_hessian(H.cpu(), W.cpu(), percdamp)
    gs = columns if group_size == -1 else group_size
    n_groups = math.ceil(columns / gs)
    scales = torch.zeros(rows, n_groups, device="cpu")  # the grids are fitted on the CPU copy of W
    zeros = torch.zeros(rows, n_groups, device="cpu")
    for g in range(n_groups):
        scales[:, g], zeros[:, g] = find_params(W[:, g * gs : (g + 1) * gs], bits, sym)
    g_idx = torch.arange(columns, device="cpu") // gs
    S_all, Z_all = scales[:, g_idx].to(dtype), zeros[:, g_idx].to(dtype)  # per-weight grid [rows, columns]

    L = torch.linalg.cholesky(H.double())
    Hinv0 = torch.cholesky_inverse(L).to(dev, dtype)
    Wd = W.to(dev, dtype)
    S_all, Z_all = S_all.to(dev), Z_all.to(dev)
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=dev)
    Q = torch.zeros(rows, columns, dtype=dtype, device=dev)
    losses = torch.zeros(rows, columns, dtype=dtype, device=dev)
    order = torch.zeros(rows, columns, dtype=torch.int64, device=dev)
    inf = torch.tensor(float("inf"), dtype=dtype, device=dev)

    for r1 in range(0, rows, batch_rows):
        r2 = min(r1 + batch_rows, rows)
        B = r2 - r1
        w = Wd[r1:r2].clone()
        S, Z = S_all[r1:r2], Z_all[r1:r2]
        # H_F^-1 = H^-1 - V^T V, V's k-th row = (the eliminated column) / sqrt(its pivot): the Gaussian
        # eliminations applied lazily, so a step reads k x d_col numbers instead of rewriting d_col^2
        V = torch.zeros(B, columns, columns, dtype=dtype, device=dev)
        diag = torch.diagonal(Hinv0).expand(B, columns).clone()
        done = torch.zeros(B, columns, dtype=torch.bool, device=dev)
        ar = torch.arange(B, device=dev)
        for step in range(columns):
            c = quantize_codes(w, S, Z, bits)
            qv = S * (c - Z)
            err = torch.where(done, 0, (w - qv) ** 2)
            scores = torch.where(done, inf, err / torch.where(done, 1, diag))
            j = torch.argmin(scores, dim=1)
            if outliers_first:
                # a weight pushed off the grid (rounding error above half a step) is taken first, largest first
                off = err > 0.25 * S * S
                j = torch.where(off.any(dim=1), torch.argmax(err, dim=1), j)
            wj, qj, dj = w[ar, j], qv[ar, j], diag[ar, j]
            codes[r1 + ar, j] = c[ar, j].to(torch.int32)
            Q[r1 + ar, j] = qj
            losses[r1 + ar, j] = (wj - qj) ** 2 / dj / 2
            order[r1:r2, step] = j
            col = Hinv0[j]  # [B, columns]: column q of H_F^-1 (symmetric) = H^-1_{:,q} - V^T V_{:,q}
            if step:
                col = col - torch.bmm(V[ar, :step, j].unsqueeze(1), V[:, :step]).squeeze(1)
            w -= ((wj - qj) / dj).unsqueeze(1) * col
            w[ar, j] = qj
            done[ar, j] = True
            if step == columns - 1:
                break
            v = col / dj.sqrt().unsqueeze(1)
            V[:, step] = v
            diag -= v * v
    return OBQResult(codes=codes.cpu(), scales=scales, zeros=zeros, Q=Q.float().cpu(), losses=losses.float().cpu(),
                     order=order.cpu())


@register
class OBQ(Method):
    """OBQ (Frantar & Alistarh, 2022): greedy exact OBS quantization per row, sequential over blocks."""

    name = "obq"
    config_cls = OBQConfig
    needs_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c = cast(OBQConfig, self.config)
        if calib is None:
            raise ConfigError("obq needs calibration data")
        t0 = time.perf_counter()
        cuda = c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
        dev = torch.device("cuda" if cuda else "cpu")
        selected = [name for name, _ in iter_linears(model, c.include, c.exclude)]
        if c.max_layers != -1:
            selected = selected[: c.max_layers]
        wanted = set(selected)
        prefix, blocks = transformer_blocks(model)
        was_training = model.training
        model.eval()
        inps, kws = capture_block_inputs(model, blocks[0], calib)
        layer_losses: dict[str, float] = {}
        layer_seconds: dict[str, float] = {}
        for b, block in enumerate(tqdm(blocks, desc="obq", leave=False, disable=None)):
            if len(layer_losses) == len(wanted):
                break  # nothing selected further down: the remaining blocks stay as they are
            bname = f"{prefix}.{b}"
            names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{bname}.{n}" in wanted]
            if not names:
                inps = [block_output(block(x, **kw)) for x, kw in zip(inps, kws)]
                continue
            results: dict[str, OBQResult] = {}
            for group in sequential_groups(names, c.true_sequential):
                Hs = GPTQ._accumulate_hessians(block, group, inps, kws)
                for n in group:
                    lin: nn.Linear = block.get_submodule(n)
                    t1 = time.perf_counter()
                    r = obq_quantize(lin.weight.data.to(dev), Hs[n], c.bits, c.group_size, c.sym, c.percdamp,
                                     c.batch_rows, c.outliers_first)
                    layer_seconds[f"{bname}.{n}"] = time.perf_counter() - t1
                    lin.weight.data.copy_(r.Q.to(lin.weight.dtype))
                    layer_losses[f"{bname}.{n}"] = float(r.losses.sum())
                    results[n] = r
            inps = [block_output(block(x, **kw)) for x, kw in zip(inps, kws)]
            for n, r in results.items():
                lin = block.get_submodule(n)
                q = IntQuantLinear.from_codes(
                    r.codes, r.scales, r.zeros, c.bits, c.group_size,
                    bias=None if lin.bias is None else lin.bias.data.clone(), sym=c.sym,
                )
                set_module(block, n, q.to(lin.weight.device))
        model.train(was_training)
        losses = list(layer_losses.values())
        arts: dict[str, Any] = dict(
            quantized_modules=len(losses),
            quantize_seconds=time.perf_counter() - t0,
            calibration_samples=int(calib.tokens.shape[0]),
            calibration_seq_len=int(calib.tokens.shape[1]),
            obq_loss_mean=sum(losses) / max(len(losses), 1),
            obq_loss_max=max(losses, default=0.0),
            obq_loss_worst_layer=max(layer_losses, key=lambda n: layer_losses[n]) if losses else None,
            layer_losses=layer_losses,
            layer_seconds=layer_seconds,
        )
        self.artifacts.update(arts)
        log.info("obq: %d linears in %.1f s", len(losses), self.artifacts["quantize_seconds"])
        return model
