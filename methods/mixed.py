"""Sensitivity-driven mixed precision: per-module bit widths (and group sizes) chosen by a multiple-choice knapsack.

The HAWQ-style recipe (Dong et al., 2019/2020: measure each layer's sensitivity, allocate bits under a
size budget by solving a knapsack):
1. on the CALIBRATION tokens only, measure for each linear m and each choice c = (bits, group size)
   (``bits_choices`` x ``group_choices``) a sensitivity s(m, c): the measured KL divergence of the
   model with only m quantized (``sensitivity="kl"``, group-wise RTN), the diag-Fisher weighted
   weight error ½ Σ F_ii (w - q)² (``"fisher"``, OBD/HAWQ), or a Taylor estimate of the KL with the
   model's own sampled Fisher, full within each token (``"fisher-kl"``; with ``base_choice`` expanded
   at the model with EVERY module already at that choice, so compounding is in the estimate), averaged
   over ``calib_windows`` windows x ``label_seeds`` label seeds with the spread recorded; each choice's
   quantized weight is the INNER quantizer's: group-wise RTN, or with ``inner: gptq`` GPTQ of that
   module alone against the Hessian of its inputs in the unquantized model (``hessian_windows``
   calibration windows; the one approximation to the sequential GPTQ that follows); values are cached
   on disk (:mod:`quantbench.methods.sensitivity`), so several targets share them;
2. the cost c(m, c) of a module is the bytes its :class:`IntQuantLinear` really stores (packed codes,
   fp16 scales, packed zeros of its group size), so the budget ``target_bpw × linear weights / 8``
   counts overheads as ``bits_per_weight`` does;
3. minimise Σ s(m, c_m) subject to Σ cost(m, c_m) ≤ budget: an exact dynamic programme over the budget
   discretised into ``resolution`` units, each cost rounded UP to whole units (so the true budget is
   always respected; the only loss is < one unit of slack per module);
4. the allocation is a per-module plan ``{module: (bits, group size)}``, handed to the inner quantizer:
   ``RTN.quantize(model, calib, plan=plan)`` or ``GPTQ.quantize(model, calib, plan=plan)`` (sequential
   over blocks, act_order off); embeddings and lm_head stay unquantized.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    check_choice,
    iter_linears,
    linear_weight_count,
    model_storage,
    register,
    tensor_bytes,
)
from .gptq import GPTQ, GPTQConfig
from .qlinear import IntQuantLinear
from .rtn import RTN, RTNConfig
from .sensitivity import GPTQFakeQuantize, measure_choice_sensitivities, module_hessians, rtn_fake_quantize, tokens_sha

log = logging.getLogger(__name__)

VALID_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class MixedConfig(ModuleSelection):
    target_bpw: float = 3.0
    bits_choices: tuple[int, ...] = VALID_BITS
    group_size: int = 128
    group_choices: tuple[int, ...] = ()  # () = (group_size,); else the knapsack also picks the group size
    inner: str = "rtn"  # "rtn" | "gptq"
    sensitivity: str = "kl"  # "kl" (measured) | "fisher" (diag-Fisher) | "fisher-kl" (sampled Fisher, full)
    calib_windows: int = 2  # calibration windows the sensitivities average over
    label_seeds: int = 2  # fisher-kl: label-sampling seeds per window (replicates = windows x seeds)
    hessian_windows: int = 8  # inner gptq: calibration windows for each module's scoring-time Hessian
    calib_seq_len: int = 512
    positions: int = 0  # fisher-kl: positions per window in the quadratic form (0: all)
    base_choice: tuple[int, ...] = ()  # fisher-kl: (bits, group) expansion point, every module there; (): fp
    resolution: int = 100_000  # budget units of the knapsack DP

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bits_choices", tuple(sorted(set(self.bits_choices))))
        object.__setattr__(self, "group_choices", tuple(dict.fromkeys(int(g) for g in self.group_choices)))
        object.__setattr__(self, "base_choice", tuple(int(x) for x in self.base_choice))
        for b in self.bits_choices:
            check_choice("mixed", "bits_choices", b, VALID_BITS)
        if not self.bits_choices:
            raise ConfigError("mixed: bits_choices must not be empty")
        if not self.target_bpw > 0:
            raise ConfigError(f"mixed: target_bpw must be positive, got {self.target_bpw}")
        for g in (self.group_size, *self.group_choices):
            if g != -1 and not 0 < g <= 1 << 20:
                raise ConfigError(f"mixed: group sizes must be in 1..{1 << 20} or -1, got {g}")
        check_choice("mixed", "inner", self.inner, ("rtn", "gptq"))
        check_choice("mixed", "sensitivity", self.sensitivity, ("kl", "fisher", "fisher-kl"))
        if not 0 < self.label_seeds <= 1000 or not 0 < self.hessian_windows <= 1_000_000:
            raise ConfigError(f"mixed: label_seeds must be in 1..1000 and hessian_windows in 1..1000000, "
                              f"got {self.label_seeds} and {self.hessian_windows}")
        if not 0 < self.calib_windows <= 1_000_000 or not 1 < self.calib_seq_len <= 1_000_000:
            raise ConfigError(f"mixed: calib_windows must be in 1..1000000 and calib_seq_len in 2..1000000, "
                              f"got {self.calib_windows} and {self.calib_seq_len}")
        if self.base_choice:
            if len(self.base_choice) != 2 or self.sensitivity != "fisher-kl":
                raise ConfigError("mixed: base_choice is a (bits, group size) pair, for sensitivity fisher-kl")
            check_choice("mixed", "base_choice bits", self.base_choice[0], VALID_BITS)
        if not 0 <= self.positions <= 1_000_000:
            raise ConfigError(f"mixed: positions must be in 0..1000000, got {self.positions}")
        if not 100 <= self.resolution <= 10_000_000:  # the knapsack DP holds modules x resolution cells
            raise ConfigError(f"mixed: resolution must be in 100..10000000, got {self.resolution}")

    @property
    def choices(self) -> list[tuple[int, int]]:
        """The knapsack's (bits, group size) choices per module: bits_choices x group sizes."""
        return [(b, g) for b in self.bits_choices for g in (self.group_choices or (self.group_size,))]


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
    """Bytes an IntQuantLinear of this shape stores at ``bits`` (built empty on the CPU, measured from its buffers)."""
    q = IntQuantLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None, device="cpu")
    return q.storage().total


@register
class Mixed(Method):
    """Mixed precision by measured sensitivity + multiple-choice knapsack (HAWQ-style allocation).

    Config (``params`` of a suite cell):

    - ``target_bpw`` (3.0): budget in bits per linear weight, counted as ``bits_per_weight`` counts;
    - ``bits_choices`` ((2, 3, 4, 8)): widths a module may get;
    - ``group_size`` (128): the group size when ``group_choices`` is empty;
    - ``group_choices`` (()): group sizes the knapsack may pick per module as well (-1: per channel);
      every (bits, group) pair is a choice, costed at its real bytes;
    - ``inner`` ("rtn"): "rtn" (the rtn method's asymmetric min-max grid) or "gptq" (no act_order);
    - ``sensitivity`` ("kl"): "kl" | "fisher" | "fisher-kl" (see the module docstring);
    - ``base_choice`` (()): fisher-kl only, the (bits, group) expansion point;
    - ``positions`` (0): fisher-kl only, positions per window in its quadratic forms (0: all);
    - ``calib_windows`` (2), ``calib_seq_len`` (512): calibration windows the sensitivities average over;
    - ``label_seeds`` (2): fisher-kl only, label-sampling seeds per window (the replicates are
      windows x seeds; their mean is the sensitivity, their standard deviation its spread);
    - ``hessian_windows`` (8): ``inner: gptq`` only, calibration windows for the Hessians of the
      scoring-time GPTQ (each candidate is scored on the weight GPTQ gives that module alone);
    - ``resolution`` (100000): budget units of the DP; ``include``/``exclude``: module patterns.

    Artifacts: ``allocation`` (module -> bits), ``group_sizes`` (module -> group, -1 per channel),
    ``bits_histogram``, ``group_histogram``, ``choice_histogram``, ``achieved_bpw``,
    ``predicted_total_sensitivity``, ``uniform_sensitivity`` (per choice), ``sensitivity_quantizer``,
    ``sensitivity_replicates``, ``sensitivity_spread`` (each module's chosen-choice sensitivity with its
    standard deviation over the replicates, and the median / max relative spread), timings.
    """

    name = "mixed"
    config_cls = MixedConfig
    needs_calibration = True

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: MixedConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ConfigError("mixed needs calibration data (sensitivities are measured on it)")
        t0 = time.perf_counter()
        model.eval()
        linears = list(iter_linears(model, c.include, c.exclude))
        names = [n for n, _ in linears]
        # 1. sensitivities on calibration tokens only
        windows = calib.tokens[: c.calib_windows, : c.calib_seq_len]
        rows = [{"name": n, "layer": _layer_of(n), "projection": n.rsplit(".", 1)[-1], "kind": "linear"} for n in names]
        choices = c.choices
        base = (c.base_choice[0], c.base_choice[1]) if c.base_choice else None
        quantize_fn, quantizer = scoring_quantizer(model, calib, names, c)
        sens = measure_choice_sensitivities(
            model,
            windows,
            choices,
            rows,
            c.sensitivity,
            quantize_fn=quantize_fn,
            quantizer=quantizer,
            positions=c.positions,
            base=base,
            seeds=c.label_seeds,
        )
        t_sens = time.perf_counter() - t0
        # 2. costs (the bytes each IntQuantLinear really stores), budget
        n_weights = linear_weight_count(model)
        budget = c.target_bpw * n_weights / 8
        fixed = sum(
            tensor_bytes(m.weight, m.bias)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and "lm_head" not in n and n not in set(names)
        )
        costs = np.array([[module_bytes(lin, b, g) for b, g in choices] for _, lin in linears], dtype=float)
        values = np.array([[sens[g][b][n]["kl"] for b, g in choices] for n in names])
        lo = (fixed + costs.min(1).sum()) * 8 / n_weights
        if budget - fixed < costs.min(1).sum():
            raise ConfigError(f"mixed: target_bpw {c.target_bpw} is below the cheapest allocation ({lo:.3f} bpw)")
        # 3. knapsack
        picks, predicted = solve_mckp(costs, values, budget - fixed, resolution=c.resolution)
        plan = {n: choices[j] for n, j in zip(names, picks)}
        # 4. quantize each module at its planned (bits, group size) with the inner quantizer
        model = inner_quantizer(c).quantize(model, calib, plan=plan)
        st = model_storage(model)["linear"]
        achieved = 8 * st.total / n_weights
        allocation = {n: b for n, (b, _) in plan.items()}
        hist = {str(b): sum(1 for v in allocation.values() if v == b) for b in c.bits_choices}
        groups = sorted({g for _, g in choices})
        ghist = {str(g): sum(1 for _, gg in plan.values() if gg == g) for g in groups}
        chosen = {n: sens[g][b][n] for n, (b, g) in plan.items()}
        rel = sorted(v.get("kl_std", 0.0) / v["kl"] for v in chosen.values() if v["kl"] > 0)
        spread = {
            "per_module": {n: {"kl": v["kl"], "kl_std": v.get("kl_std")} for n, v in chosen.items()},
            "median_rel_std": rel[len(rel) // 2] if rel else None,
            "max_rel_std": rel[-1] if rel else None,
        }
        uniform = {
            f"{b}" if len(groups) == 1 else f"{b}/g{g}": float(values[:, j].sum()) for j, (b, g) in enumerate(choices)
        }
        self.artifacts.update(
            allocation=allocation,
            group_sizes={n: g for n, (_, g) in plan.items()},
            bits_histogram=hist,
            group_histogram=ghist,
            choice_histogram={f"{b}/g{g}": sum(1 for v in plan.values() if v == (b, g)) for b, g in choices},
            target_bpw=c.target_bpw,
            achieved_bpw=achieved,
            predicted_total_sensitivity=predicted,
            uniform_sensitivity=uniform,
            solver="exact DP over the budget discretised in units (costs rounded up)",
            sensitivity=c.sensitivity,
            sensitivity_quantizer=quantizer,
            sensitivity_replicates=int(windows.shape[0]) * (c.label_seeds if c.sensitivity == "fisher-kl" else 1),
            sensitivity_spread=spread,
            calib_tokens=list(windows.shape),
            sensitivity_seconds=round(t_sens, 2),
            quantize_seconds=round(time.perf_counter() - t0, 2),
        )
        log.info(
            "mixed: %s bpw (target %s), bits histogram %s, predicted sensitivity %.4g",
            f"{achieved:.4f}",
            c.target_bpw,
            hist,
            predicted,
        )
        return model


def scoring_quantizer(
    model: nn.Module, calib: Calibration, names: list[str], c: MixedConfig
) -> tuple[Callable[..., torch.Tensor], str]:
    """The fake quantizer the sensitivities are scored with (the inner quantizer's) and its cache name.

    ``inner: rtn``: group-wise RTN.  ``inner: gptq``: GPTQ of each module alone, with the inner GPTQ's
    settings, against the Hessian of its inputs in the unquantized model over ``hessian_windows``
    calibration windows (the name carries those tokens' hash, so the cache tells Hessians apart).
    """
    if c.inner != "gptq":
        return rtn_fake_quantize, "rtn"
    g = inner_quantizer(c).config
    assert isinstance(g, GPTQConfig)
    hwin = calib.tokens[: c.hessian_windows, : c.calib_seq_len]
    hessians = module_hessians(model, hwin, names)
    fn = GPTQFakeQuantize(hessians, sym=g.sym, act_order=g.act_order, percdamp=g.percdamp, blocksize=g.blocksize,
                          mse=g.mse, group_grid=g.group_grid)
    name = f"gptq(act_order={g.act_order},damp={g.percdamp},bs={g.blocksize},grid={g.group_grid})"
    return fn, f"{name}@{tokens_sha(hwin)}"


def inner_quantizer(c: MixedConfig) -> RTN | GPTQ:
    """The quantizer that carries out the plan, on the same module selection.

    RTN: asymmetric min-max grid.  GPTQ: act_order off, since its g_idx would add bytes the knapsack
    did not budget for.  Every selected module is in the plan, so the configs' own bits are unused.
    """
    if c.inner == "gptq":
        return GPTQ(GPTQConfig(act_order=False, include=c.include, exclude=c.exclude))
    return RTN(RTNConfig(include=c.include, exclude=c.exclude))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for p in parts:
        if p.isdigit():
            return int(p)
    return None
