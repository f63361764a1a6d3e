"""Sensitivity-driven mixed precision: per-module bit widths chosen by a multiple-choice knapsack.

The HAWQ-style recipe (Dong et al., 2019/2020: measure each layer's sensitivity, allocate bits under a
size budget by solving a knapsack), with measured KL as the sensitivity:
1. on the CALIBRATION tokens only, measure for each linear m and each width b in ``bits_choices``
   the KL divergence s(m, b) of the model with only m quantized (group-wise RTN), or, with
   ``sensitivity="fisher"``, the diag-Fisher weighted weight error ½ Σ F_ii (w - q)² (OBD/HAWQ);
   values are cached on disk (:mod:`quantbench.harness.sensitivity`), so several targets share them;
2. the cost c(m, b) of a module is the bytes its :class:`IntQuantLinear` really stores (packed codes,
   fp16 scales, packed zeros), so the budget ``target_bpw × linear weights / 8`` counts overheads as
   ``bits_per_weight`` does;
3. minimise Σ s(m, b_m) subject to Σ c(m, b_m) ≤ budget: an exact dynamic programme over the budget
   discretised into ``resolution`` units, each cost rounded UP to whole units (so the true budget is
   always respected; the only loss is < one unit of slack per module);
4. quantize each module at its width with the inner quantizer (RTN, or GPTQ run sequentially with
   per-module bits); embeddings and lm_head stay unquantized.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from quantbench.methods.base import (
    DEFAULT_SKIP,
    Calibration,
    ConfigError,
    Method,
    MethodConfig,
    check_choice,
    iter_linears,
    linear_weight_count,
    model_storage,
    register,
    set_module,
    tensor_bytes,
)
from quantbench.methods.qlinear import IntQuantLinear
from quantbench.methods.rtn import rtn_quantize_weight

log = logging.getLogger(__name__)

VALID_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class MixedConfig(MethodConfig):
    target_bpw: float = 3.0
    bits_choices: tuple[int, ...] = VALID_BITS
    group_size: int = 128
    inner: str = "rtn"  # "rtn" | "gptq"
    sensitivity: str = "kl"  # "kl" (measured) | "fisher" (diag-Fisher weighted weight error)
    calib_windows: int = 1
    calib_seq_len: int = 512
    resolution: int = 100_000  # budget units of the knapsack DP
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits_choices", tuple(sorted(set(self.bits_choices))))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for b in self.bits_choices:
            check_choice("mixed", "bits_choices", b, VALID_BITS)
        if not self.bits_choices:
            raise ConfigError("mixed: bits_choices must not be empty")
        if not self.target_bpw > 0:
            raise ConfigError(f"mixed: target_bpw must be positive, got {self.target_bpw}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"mixed: group_size must be positive or -1, got {self.group_size}")
        check_choice("mixed", "inner", self.inner, ("rtn", "gptq"))
        check_choice("mixed", "sensitivity", self.sensitivity, ("kl", "fisher"))
        if self.calib_windows <= 0 or self.calib_seq_len <= 1:
            raise ConfigError("mixed: calib_windows must be >= 1 and calib_seq_len >= 2")
        if self.resolution < 100:
            raise ConfigError(f"mixed: resolution must be >= 100, got {self.resolution}")


# --------------------------------------------------------------------------- knapsack


def solve_mckp(
    costs: np.ndarray, values: np.ndarray, budget: float, unit: float | None = None, resolution: int = 100_000
) -> tuple[list[int], float]:
    """Multiple-choice knapsack: pick one choice per item minimising Σ value with Σ cost ≤ budget.

    ``costs``/``values``: [items, choices] (np.inf cost = choice not available).  Exact dynamic
    programme over the budget in units of ``unit`` (default ``budget / resolution``); costs are rounded
    up to whole units, so the returned choice always satisfies the true budget, and with integer
    costs and ``unit=1`` the solution is the exact optimum.  Returns (choice per item, total value).
    """
    costs = np.asarray(costs, dtype=float)
    values = np.asarray(values, dtype=float)
    n, k = costs.shape
    unit = unit or budget / resolution
    cap = int(math.floor(budget / unit + 1e-9))
    w = np.ceil(costs / unit - 1e-9)
    if np.any(np.isfinite(w) & (w < 0)):
        raise ValueError("negative cost")
    dp = np.zeros(cap + 1)  # best value with total units <= c, no item chosen yet
    choice = np.zeros((n, cap + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for j in range(k):
            if not np.isfinite(w[i, j]) or w[i, j] > cap:
                continue
            wij = int(w[i, j])
            cand = np.full(cap + 1, np.inf)
            cand[wij:] = dp[: cap + 1 - wij] + values[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp, choice[i] = new, arg
    if not np.isfinite(dp[cap]):
        raise ConfigError("mixed: the budget is below the cheapest allocation")
    picks = [0] * n
    c = cap
    for i in range(n - 1, -1, -1):
        j = int(choice[i, c])
        picks[i] = j
        c -= int(w[i, j])
    return picks, float(dp[cap])


# --------------------------------------------------------------------------- costs


def module_bytes(lin: nn.Linear, bits: int, group_size: int) -> int:
    """Bytes an IntQuantLinear of this shape stores at ``bits`` (built empty, measured from its buffers)."""
    q = IntQuantLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None)
    return q.storage().total


@register
class Mixed(Method):
    """Mixed precision by measured sensitivity + multiple-choice knapsack (HAWQ-style allocation)."""

    name = "mixed"
    config_cls = MixedConfig
    needs_calibration = True

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        from quantbench.harness.sensitivity import measure_sensitivities

        c: MixedConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ConfigError("mixed needs calibration data (sensitivities are measured on it)")
        t0 = time.perf_counter()
        model.eval()
        linears = list(iter_linears(model, c.include, c.exclude))
        names = [n for n, _ in linears]
        # 1. sensitivities on calibration tokens only
        windows = calib.tokens[: c.calib_windows, : c.calib_seq_len]
        rows = [{"name": n, "layer": _layer_of(n), "projection": n.rsplit(".", 1)[-1], "kind": "linear"}
                for n in names]
        sens = measure_sensitivities(model, windows, c.bits_choices, c.group_size, rows, c.sensitivity)
        t_sens = time.perf_counter() - t0
        # 2. costs, budget
        n_weights = linear_weight_count(model)
        budget = c.target_bpw * n_weights / 8
        fixed = sum(tensor_bytes(m.weight, m.bias) for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and "lm_head" not in n and n not in set(names))
        costs = np.array([[module_bytes(lin, b, c.group_size) for b in c.bits_choices] for _, lin in linears],
                         dtype=float)
        values = np.array([[sens[b][n]["kl"] for b in c.bits_choices] for n in names])
        lo = (fixed + costs.min(1).sum()) * 8 / n_weights
        if budget - fixed < costs.min(1).sum():
            raise ConfigError(f"mixed: target_bpw {c.target_bpw} is below the cheapest allocation ({lo:.3f} bpw)")
        # 3. knapsack
        picks, predicted = solve_mckp(costs, values, budget - fixed, resolution=c.resolution)
        allocation = {n: c.bits_choices[j] for n, j in zip(names, picks)}
        # 4. quantize
        if c.inner == "rtn":
            for name, lin in tqdm(linears, desc="mixed", leave=False):
                b = allocation[name]
                codes, scales, zeros = rtn_quantize_weight(lin.weight.data, b, c.group_size, False)
                set_module(model, name, IntQuantLinear.from_codes(
                    codes, scales, zeros, b, c.group_size, bias=None if lin.bias is None else lin.bias.data.clone()))
        else:
            _gptq_mixed(model, calib, allocation, c.group_size)
        st = model_storage(model)["linear"]
        achieved = 8 * st.total / n_weights
        hist = {str(b): sum(1 for v in allocation.values() if v == b) for b in c.bits_choices}
        self.artifacts.update(
            allocation=allocation,
            bits_histogram=hist,
            target_bpw=c.target_bpw,
            achieved_bpw=achieved,
            predicted_total_sensitivity=predicted,
            uniform_sensitivity={str(b): float(values[:, j].sum()) for j, b in enumerate(c.bits_choices)},
            solver="exact DP over the budget discretised in units (costs rounded up)",
            sensitivity=c.sensitivity,
            calib_tokens=list(windows.shape),
            sensitivity_seconds=round(t_sens, 2),
            quantize_seconds=round(time.perf_counter() - t0, 2),
        )
        log.info("mixed: %s bpw (target %s), bits histogram %s, predicted sensitivity %.4g",
                 f"{achieved:.4f}", c.target_bpw, hist, predicted)
        return model


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for p in parts:
        if p.isdigit():
            return int(p)
    return None


@torch.no_grad()
def _gptq_mixed(model: nn.Module, calib: Calibration, allocation: dict[str, int], group_size: int) -> None:
    """GPTQ (Frantar et al., 2022) wired as in methods/gptq.py, each linear at its own width.

    act_order is off: its g_idx would add bytes the knapsack did not budget for.
    """
    from quantbench.methods.gptq import GPTQ, _block_output, capture_block_inputs, sequential_groups, transformer_blocks
    from quantbench.methods.gptq_solver import gptq_quantize

    prefix, blocks = transformer_blocks(model)
    inps, kws = capture_block_inputs(model, blocks[0], calib)
    for b, block in enumerate(tqdm(blocks, desc="mixed-gptq", leave=False)):
        bname = f"{prefix}.{b}"
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{bname}.{n}" in allocation]
        results: dict[str, Any] = {}
        for group in sequential_groups(names, True):
            Hs = GPTQ._accumulate_hessians(block, group, inps, kws)
            for n in group:
                lin: nn.Linear = block.get_submodule(n)
                r = gptq_quantize(lin.weight.data, Hs[n], allocation[f"{bname}.{n}"], group_size, False, False)
                lin.weight.data.copy_(r.Q.to(lin.weight.dtype))
                results[n] = r
        inps = [_block_output(block(x, **kw)) for x, kw in zip(inps, kws)]
        for n, r in results.items():
            lin = block.get_submodule(n)
            set_module(block, n, IntQuantLinear.from_codes(
                r.codes, r.scales, r.zeros, allocation[f"{bname}.{n}"], group_size, g_idx=r.g_idx,
                bias=None if lin.bias is None else lin.bias.data.clone()))
