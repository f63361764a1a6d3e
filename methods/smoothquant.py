"""SmoothQuant: accurate and efficient post-training quantization for LLMs (Xiao et al., 2023, arXiv:2211.10438).

W8A8: int8 symmetric per-output-channel weights and int8 activations (per token, dynamic, or per
tensor with a calibrated static scale), executed by a real int8 GEMM
(:class:`~quantbench.methods.w8a8_linear.W8A8Linear`).  ``w8a8`` quantizes the model as it is;
``smoothquant`` first migrates the activation outliers into the weights:

1. Calibration: per-input-channel activation absmax ``max|X_j|`` of every linear (forward hooks over
   the calibration tokens), plus each output's absmax for static output scales.
2. Smoothing factor, for each group of linears sharing one normalized input
   (llama: input_layernorm -> q,k,v and post_attention_layernorm -> gate,up; Gemma 2/3, whose
   post_attention_layernorm normalizes the attention output: pre_feedforward_layernorm -> gate,up;
   OPT: self_attn_layer_norm -> q,k,v and final_layer_norm -> fc1)::

       s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

   with ``max|W_j|`` the max over every weight of the group in input column j (both factors
   clamped at 1e-5 as the reference does).
3. Folding: ``X diag(s)^-1`` goes into the preceding norm (RMSNorm weight; LayerNorm weight and
   bias; Gemma's RMSNorm, which scales by ``1 + weight``: ``weight <- (1 + weight) / s - 1``),
   ``diag(s) W`` into the following linears, so the fp model computes the same function.
   o_proj / down_proj / out_proj / fc2 have no foldable predecessor and are quantized unsmoothed.
4. Quantization of every linear to W8A8; with ``quantize_bmm_input`` the q/k/v outputs (the inputs
   of the attention matmuls) are fake-quantized too, as in the reference's fake-quant model.

Diagnostics (``artifacts["outliers"]``): per smoothed group, the ratio of the largest to the median
input-channel absmax of the activations before and after smoothing (after = absmax / s), and the same
ratio of the weights' input-column absmax (max over the group's linears) before and after ``diag(s) W``:
alpha = 0 leaves the activations' ratio as it is, alpha = 1 flattens it and moves the spread to the
weights (``w_before`` / ``w_after``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from tqdm import tqdm

from .base import (
    Calibration,
    ConfigError,
    Method,
    ModuleSelection,
    check_choice,
    iter_linears,
    model_fingerprint,
    register,
    set_module,
)
from .placement import forward_for_hooks, model_device
from .w8a8_linear import ACT_SCHEMES, W8A8Linear

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: clamp of the weight and smoothing factors (the reference's value)
CLAMP = 1e-5
#: q/k/v projections: their outputs are the attention matmul inputs (``quantize_bmm_input``)
BMM_INPUT_PROJS = ("q_proj", "k_proj", "v_proj")
#: RMSNorm classes (transformers) that scale by ``1 + weight`` instead of ``weight``
ONE_PLUS_WEIGHT_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class W8A8Config(ModuleSelection):
    act_scheme: str = "per_token"
    weight_scheme: str = "per_channel"
    quantize_bmm_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("w8a8", "act_scheme", self.act_scheme, ACT_SCHEMES)
        check_choice("w8a8", "weight_scheme", self.weight_scheme, ("per_channel",))


@dataclass(frozen=True)
class SmoothQuantConfig(W8A8Config):
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")


# --------------------------------------------------------------------------- step 1: calibration


@dataclass
class ActStats:
    """Per-linear calibration statistics."""

    input_absmax: torch.Tensor  # [in_features], max over calibration tokens of |X_j|
    output_absmax: torch.Tensor  # scalar, max |Y|


def calibrate_act_stats(model: nn.Module, calib: Calibration, names: list[str]) -> dict[str, ActStats]:
    """Absmax statistics of the named linears' inputs and outputs over the calibration tokens.

    One pass per (exact model weights, names) and Calibration: naive W8A8 and SmoothQuant cells of a run
    that start from the same fp model share it (:meth:`Calibration.memoized`); each caller gets its own
    copy, since smoothing rewrites the input statistics.
    """
    key = ("act_absmax", model_fingerprint(model), tuple(names))
    stats = calib.memoized(key, lambda: _capture_act_stats(model, calib, names))
    return {n: ActStats(s.input_absmax.clone(), s.output_absmax.clone()) for n, s in stats.items()}


@torch.no_grad()
def _capture_act_stats(model: nn.Module, calib: Calibration, names: list[str]) -> dict[str, ActStats]:
    stats: dict[str, ActStats] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().float()
            xmax = x.amax(dim=0)
            ymax = output.detach().abs().float().amax()
            if name in stats:
                s = stats[name]
                torch.maximum(s.input_absmax, xmax, out=s.input_absmax)
                torch.maximum(s.output_absmax, ymax, out=s.output_absmax)
            else:
                stats[name] = ActStats(xmax.clone(), ymax.clone())
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        torch.manual_seed(calib.seed)
        device = model_device(model)
        for batch in tqdm(list(calib.batches(1)), desc="smoothquant calibration", leave=False, disable=None):
            forward_for_hooks(model, batch.to(device))  # the hooked linears are the blocks' (never the lm_head)
    finally:
        for h in handles:
            h.remove()
    return stats


# --------------------------------------------------------------------------- step 2-3: smoothing


@dataclass
class SmoothGroup:
    """One normalized input shared by several linears: ``norm -> fcs``."""

    layer: str
    group: str
    norm_name: str
    fc_names: list[str]


def _submodule(mod: nn.Module, path: str) -> nn.Module | None:
    try:
        return mod.get_submodule(path)
    except AttributeError:
        return None


def mlp_input_norm(block: nn.Module) -> str:
    """The norm whose output a llama-style block's MLP reads: ``pre_feedforward_layernorm`` where the block
    has one (Gemma 2/3: their ``post_attention_layernorm`` normalizes the attention output before the
    residual add), else ``post_attention_layernorm``."""
    pre_ff = _submodule(block, "pre_feedforward_layernorm")
    return "pre_feedforward_layernorm" if isinstance(pre_ff, nn.Module) else "post_attention_layernorm"


def find_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """The (norm -> linears) mappings of llama-style (incl. Gemma 2/3) and OPT-style (pre-LN) decoder blocks."""
    groups: list[SmoothGroup] = []
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""

        def present(*paths: str, mod: nn.Module = mod, pre: str = pre) -> list[str]:
            return [pre + p for p in paths if isinstance(_submodule(mod, p), nn.Linear)]

        if hasattr(mod, "input_layernorm") and hasattr(mod, "post_attention_layernorm"):  # llama-style
            qkv = present("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            gate_up = present("mlp.gate_proj", "mlp.up_proj")
            if qkv:
                groups.append(SmoothGroup(name, "qkv", pre + "input_layernorm", qkv))
            if gate_up:
                groups.append(SmoothGroup(name, "gate_up", pre + mlp_input_norm(mod), gate_up))
        elif hasattr(mod, "self_attn_layer_norm") and hasattr(mod, "final_layer_norm"):  # OPT-style
            if not getattr(mod, "do_layer_norm_before", True):
                log.warning("%s is post-LN: its norms do not precede its linears; not smoothed", name)
                continue
            qkv = present("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            fc1 = present("fc1")
            if qkv:
                groups.append(SmoothGroup(name, "qkv", pre + "self_attn_layer_norm", qkv))
            if fc1:
                groups.append(SmoothGroup(name, "fc1", pre + "final_layer_norm", fc1))
    return groups


def weight_column_absmax(fcs: list[nn.Linear]) -> torch.Tensor:
    """max|W_j| per input column j over every weight of ``fcs`` (the linears sharing one input), fp32."""
    return torch.stack([fc.weight.detach().abs().float().amax(dim=0) for fc in fcs]).amax(dim=0)


def smoothing_factors(act_absmax: torch.Tensor, fcs: list[nn.Linear], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), max|W_j| over every weight of ``fcs`` in column j."""
    w_absmax = weight_column_absmax(fcs).clamp(min=CLAMP)
    s = act_absmax.float().pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp(min=CLAMP)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, fcs: list[nn.Linear], s: torch.Tensor) -> None:
    """X diag(s)^-1 into the norm (weight, and bias if any), diag(s) W into each linear.

    A norm that scales by ``1 + weight`` (:data:`ONE_PLUS_WEIGHT_NORMS`) gets ``(1 + weight) / s - 1``,
    computed in float32."""
    weight = cast(torch.Tensor, norm.weight)  # the norm's affine parameters
    if type(norm).__name__ in ONE_PLUS_WEIGHT_NORMS:
        weight.copy_(((1.0 + weight.float()) / s.float() - 1.0).to(weight.dtype))
    else:
        weight.div_(s.to(weight.dtype))
    if getattr(norm, "bias", None) is not None:
        bias = cast(torch.Tensor, norm.bias)
        bias.div_(s.to(bias.dtype))
    for fc in fcs:
        fc.weight.mul_(s.to(fc.weight.dtype).unsqueeze(0))


def outlier_ratio(absmax: torch.Tensor) -> float:
    """Largest over median input-channel absmax."""
    return float(absmax.max() / absmax.median().clamp(min=1e-12))


def weight_outlier_ratio(fcs: list[nn.Linear]) -> float:
    """:func:`outlier_ratio` of the weights' input-column absmax, max over ``fcs`` (those sharing one input)."""
    return outlier_ratio(weight_column_absmax(fcs))


# --------------------------------------------------------------------------- methods


@register
class W8A8(Method):
    """Naive W8A8 (no smoothing), the baseline of the SmoothQuant paper."""

    name = "w8a8"
    config_cls = W8A8Config
    needs_calibration = True
    target = "weights+activations"

    def smooth(self, model: nn.Module, stats: dict[str, ActStats]) -> None:
        """No smoothing: record the outlier ratios of the groups SmoothQuant would smooth (diagnostics only)."""
        rows = []
        for g in find_smooth_groups(model):
            if g.fc_names[0] in stats:
                r = outlier_ratio(stats[g.fc_names[0]].input_absmax)
                w = weight_outlier_ratio([cast(nn.Linear, model.get_submodule(n)) for n in g.fc_names])
                rows.append({"layer": g.layer, "group": g.group, "before": r, "after": r, "w_before": w, "w_after": w})
        self.artifacts["outliers"] = rows

    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: W8A8Config = self.config  # type: ignore[assignment]
        names = [n for n, _ in iter_linears(model, c.include, c.exclude)]
        static = c.act_scheme == "per_tensor_static"
        stats: dict[str, ActStats] = {}
        if calib is not None:
            stats = calibrate_act_stats(model, calib, names)
        elif static:
            raise ConfigError(f"{self.name}: act_scheme=per_tensor_static needs calibration data")
        self.smooth(model, stats)  # steps 2-3 (smoothquant); updates stats' input absmax to X / s

        for name in tqdm(names, desc=self.name, leave=False, disable=None):  # step 4
            lin = cast(nn.Linear, model.get_submodule(name))  # names come from iter_linears
            st = stats.get(name)
            quantize_output = c.quantize_bmm_input and name.rsplit(".", 1)[-1] in BMM_INPUT_PROJS
            if static and st is None:
                raise RuntimeError(f"{name} saw no calibration tokens; cannot set a static scale")
            q = W8A8Linear.from_linear(
                lin, c.act_scheme,
                input_absmax=st.input_absmax.max() if st is not None else None,
                quantize_output=quantize_output,
                output_absmax=st.output_absmax if st is not None else None,
            )
            set_module(model, name, q)
        self.artifacts["quantized_modules"] = len(names)
        self._save_outliers()
        return model

    def _save_outliers(self) -> None:
        if self.artifact_dir is None or not self.artifacts.get("outliers"):
            return
        try:
            df = outlier_table(self.artifacts)
            Path(self.artifact_dir).mkdir(parents=True, exist_ok=True)
            df.to_csv(Path(self.artifact_dir) / "outliers.csv", index=False)
            plot_outliers(df, Path(self.artifact_dir) / "outliers")
        except Exception as e:  # diagnostics must never fail a cell
            log.warning("could not write outlier diagnostics: %s", e)


@register
class SmoothQuant(W8A8):
    """SmoothQuant (Xiao et al., 2023): migrate activation outliers into weights with s, then W8A8."""

    name = "smoothquant"
    config_cls = SmoothQuantConfig

    def smooth(self, model: nn.Module, stats: dict[str, ActStats]) -> None:
        c: SmoothQuantConfig = self.config  # type: ignore[assignment]
        if not stats:
            raise ConfigError("smoothquant needs calibration data")
        rows = []
        for g in find_smooth_groups(model):
            if g.fc_names[0] not in stats:  # excluded from quantization
                continue
            fcs = [cast(nn.Linear, model.get_submodule(n)) for n in g.fc_names]  # present() checked
            act = stats[g.fc_names[0]].input_absmax  # the same input for every fc of the group
            s = smoothing_factors(act, fcs, c.alpha)  # step 2
            w_before = weight_outlier_ratio(fcs)
            fold_smoothing(model.get_submodule(g.norm_name), fcs, s)  # step 3
            smoothed = act / s
            for n in g.fc_names:
                if n in stats:
                    stats[n].input_absmax = smoothed.clone()
            rows.append({"layer": g.layer, "group": g.group, "before": outlier_ratio(act),
                         "after": outlier_ratio(smoothed), "w_before": w_before, "w_after": weight_outlier_ratio(fcs)})
        self.artifacts["alpha"] = float(c.alpha)
        self.artifacts["outliers"] = rows
        self.artifacts["smoothed_groups"] = len(rows)


# --------------------------------------------------------------------------- diagnostics for reports


def outlier_table(artifacts: dict[str, Any]) -> pd.DataFrame:
    """``artifacts["outliers"]`` as a DataFrame: layer, group, before, after, w_before, w_after, reduction
    (before / after, of the activations)."""
    import pandas as pd

    cols = ["layer", "group", "before", "after", "w_before", "w_after"]
    df = pd.DataFrame(artifacts.get("outliers", []), columns=cols)
    df["reduction"] = df["before"] / df["after"]
    return df


def plot_outliers(df: pd.DataFrame, path: str | Path) -> list[Path]:
    """Max/median channel absmax per layer, before and after smoothing, one panel per group (PNG + SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(df["group"]))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 3.5), squeeze=False)
    for ax, g in zip(axes[0], groups):
        d = df[df["group"] == g].reset_index(drop=True)
        x = range(len(d))
        ax.plot(x, d["before"], "o-", label="before smoothing")
        ax.plot(x, d["after"], "s-", label="after smoothing")
        if d["w_after"].notna().any():
            ax.plot(x, d["w_before"], "o--", alpha=0.6, label="weights before")
            ax.plot(x, d["w_after"], "s--", alpha=0.6, label="weights after")
        ax.set_yscale("log")
        ax.set_title(f"{g}: max / median input-channel absmax")
        ax.set_xlabel("layer index")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    for p in out:
        fig.savefig(p)
    plt.close(fig)
    return out
