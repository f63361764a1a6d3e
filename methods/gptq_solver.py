"""The GPTQ per-layer solver (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for GPTs").

Pure math, no model wiring: given a weight ``W`` [rows, columns] and the Hessian ``H = 2 X X^T / n``
of the layer-wise objective ||W X - Ŵ X||², quantize ``W`` column by column, compensating each
column's quantization error on the not-yet-quantized columns through the upper Cholesky factor of
``H^-1`` (OBQ's update in its Cholesky form), with lazy batch updates every ``blocksize`` columns.

The grid is the uniform min-max grid of :mod:`quantbench.kernels.intq` (scales rounded up to fp16,
as the packed layout stores them, so the solver's ``Q`` is exactly what the packed module computes
with), optionally with the reference ``Quantizer``'s MSE search for the clipping range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.intq import grid_params, quantize_codes

#: MSE clipping search constants of the GPTQ reference ``Quantizer``
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAXSHRINK = 0.8


@dataclass
class GPTQResult:
    """Codes and grid of a quantized layer, in the layer's original column order."""

    codes: torch.Tensor  # int32 [rows, columns]
    scales: torch.Tensor  # fp32 (fp16-representable) [rows, n_groups]
    zeros: torch.Tensor  # integer-valued fp32 [rows, n_groups]
    g_idx: torch.Tensor  # int32 [columns]: group of each column
    Q: torch.Tensor  # dequantized weight [rows, columns] = scales[g_idx] * (codes - zeros[g_idx])
    losses: torch.Tensor  # [rows, columns]: the OBQ loss (w - q)^2 / (2 [H^-1]_qq^2) of each weight


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero of a min-max grid over ``w`` [rows, k] (the reference ``Quantizer``).

    With ``mse`` the range [min, max] is shrunk by ``p = 1 - i / MSE_GRID`` for
    ``i < MSE_MAXSHRINK * MSE_GRID`` and the ``p`` minimising sum |w - ŵ|^MSE_NORM is kept per row.
    """
    wmin, wmax = w.amin(1), w.amax(1)
    scale, zero = grid_params(wmin, wmax, bits, sym, scale_dtype=torch.float16)
    if not mse:
        return scale, zero
    best = torch.full_like(wmin, float("inf"))
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s1, z1 = grid_params(p * wmin, p * wmax, bits, sym, scale_dtype=torch.float16)
        q = quantize_codes(w, s1.unsqueeze(1), z1.unsqueeze(1), bits)
        err = (s1.unsqueeze(1) * (q - z1.unsqueeze(1)) - w).abs_().pow_(MSE_NORM).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (diag H = 0): H_ii = 1 and W's column zeroed; then ``damp = percdamp * mean(diag H)``.

    Returns the dampened H and the (modified copy of) W.
    """
    H = H.clone().float()
    W = W.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    return H, W


def hinv_upper_cholesky(H: torch.Tensor) -> torch.Tensor:
    """H^-1 through a Cholesky factorization, then its upper Cholesky factor (the rows OBQ needs)."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = True,
    static_groups: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
    mse: bool = False,
    group_grid: str = "reference",
) -> GPTQResult:
    """Quantize ``W`` [rows, columns] against the Hessian ``H`` [columns, columns] (GPTQ, Algorithm 1).

    ``group_size=-1``: one grid per row.  With groups, each group's grid is computed when its first
    column is reached (``static_groups``: on the original weights before any update, so act-order
    does not scatter groups).  Which weights the grid is fitted on (``group_grid``):

    * ``"reference"`` (default, the reference ``fasterquant`` and AutoGPTQ/GPTQModel): the group's
      columns of ``W`` as they stand at the start of the current lazy block -- every earlier block's
      error feedback applied, but not the feedback of the earlier columns of the *current* block
      (that lives in the block's working copy until the block ends).  When ``group_size`` is a
      multiple of ``blocksize`` every group starts at a block boundary and the two readings agree.
    * ``"updated"``: the group's columns with every earlier column's feedback applied (the current
      block's pending updates included), i.e. the grid OBQ applied one column at a time would see;
      the result then does not depend on ``blocksize``.

    ``act_order`` processes the columns by descending diag(H) and returns everything in the
    original order with ``g_idx``.
    """
    if group_grid not in ("reference", "updated"):
        raise ValueError(f"gptq: group_grid must be 'reference' or 'updated', got {group_grid!r}")
    rows, columns = W.shape
    H, W = prepare_hessian(H, W, percdamp)
    gs = columns if group_size == -1 else group_size
    n_groups = math.ceil(columns / gs)

    scale_row, zero_row = find_params(W, bits, sym, mse)  # per-channel grid when group_size = -1
    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups and group_size != -1:
        static = [find_params(W[:, g * gs : (g + 1) * gs], bits, sym, mse) for g in range(n_groups)]

    perm = torch.arange(columns, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    invperm = torch.argsort(perm)

    Hinv = hinv_upper_cholesky(H)
    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=W.device)
    losses = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    g_perm = torch.zeros(columns, dtype=torch.int32, device=W.device)  # group of each processed (permuted) column
    scale, zero = scale_row, zero_row

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size == -1:
                g = 0
            elif static:
                g = int(perm[col]) // gs
                scale, zero = static[g]
            else:
                g = col // gs
                if col % gs == 0:
                    if group_grid == "reference":
                        # W's columns as of the block start (this block's feedback is still in W1)
                        cur = W[:, col : col + gs]
                    else:
                        # fully updated: this block's columns from W1; later blocks' columns from W
                        # plus this block's pending update
                        later = W[:, i2 : col + gs] - Err1[:, :i] @ Hinv[i1:col, i2 : col + gs]
                        cur = torch.cat([W1[:, i : i + gs], later], dim=1)
                    scale, zero = find_params(cur, bits, sym, mse)
            scales[:, g], zeros[:, g] = scale, zero
            g_perm[col] = g
            w = W1[:, i]
            d = Hinv1[i, i]
            q_code = quantize_codes(w, scale, zero, bits)
            q = scale * (q_code - zero)
            codes[:, col] = q_code.to(torch.int32)
            Q[:, col] = q
            losses[:, col] = (w - q) ** 2 / d**2 / 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        # lazy batch update of all remaining columns
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return GPTQResult(
        codes=codes[:, invperm].contiguous(),
        scales=scales,
        zeros=zeros,
        g_idx=g_perm[invperm].contiguous(),
        Q=Q[:, invperm].contiguous(),
        losses=losses[:, invperm].contiguous(),
    )


def obq_naive(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, percdamp: float = 0.01
) -> torch.Tensor:
    """Reference for tests: OBQ's update applied one column at a time on the explicit inverse Hessian.

    For column q (in order): Ŵ_q = quant(W_q); δ = -(W_q - Ŵ_q) / [H^-1]_qq · [H^-1]_{q,:}; then q is
    removed from H^-1 by Gaussian elimination.  Groups' grids are taken from the updated weights.
    """
    rows, columns = W.shape
    H, W = prepare_hessian(H, W, percdamp)
    gs = columns if group_size == -1 else group_size
    Hinv = torch.linalg.inv(H.double())
    W = W.double()
    Q = torch.zeros_like(W)
    scale = zero = None
    for q in range(columns):
        if q % gs == 0:
            scale, zero = find_params(W[:, q : q + gs].float(), bits, sym)
            scale, zero = scale.double(), zero.double()
        assert scale is not None and zero is not None  # set at q = 0 (0 % gs == 0)
        w = W[:, q]
        Q[:, q] = scale * (quantize_codes(w, scale, zero, bits) - zero)
        err = (w - Q[:, q]) / Hinv[q, q]
        W[:, q:] -= err.unsqueeze(1) * Hinv[q, q:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, q : q + 1] @ Hinv[q : q + 1, :] / Hinv[q, q]
    return Q.float()
