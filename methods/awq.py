"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024, arXiv:2306.00978).

Weight-only int quantization (asymmetric, per group of input columns, RTN's grid) after two
calibration-driven, function-preserving edits of each llama-style decoder block:

1. Scale search, per scaling group ``prev -> fcs`` (the linears that read one input):
   ``input_layernorm -> q,k,v``; ``v_proj -> o_proj`` (only when v's output width equals o's input
   width: skipped under GQA, as the reference does); ``post_attention_layernorm -> gate,up`` (Gemma 2/3:
   ``pre_feedforward_layernorm``; their ``(1 + weight)`` RMSNorm takes ``(1 + weight) / s - 1``);
   ``up_proj -> down_proj``.  With ``s_X`` the mean ``|X|`` per input channel of the group's input,
   each ``alpha = i / n_grid`` (``i < n_grid``) gives ``s = s_X^alpha / sqrt(max * min)``; the fcs'
   weights ``W diag(s)`` are fake-quantized and the MSE of the fcs' outputs (``X diag(s)^-1`` through
   them) against the fp outputs is measured.  The best ``alpha`` is kept, ``1/s`` is folded into
   ``prev`` (a norm's weight, or the previous linear's output rows) and ``s`` into the fcs' columns.
   Simplification, stated: the loss is the outputs of the scaled linears themselves (concatenated),
   not the output of the sub-module that consumes them (the reference runs the attention / MLP).
2. Clipping search (every selected linear but q/k, as the reference avoids them): per output row and
   group, the min and max are shrunk by ``1 - i / n_grid`` down to ``1 - max_shrink``; the ratio with
   the least output MSE (on at most ``clip_tokens`` tokens) clips the weights.
3. Every selected linear goes through RTN (:class:`~quantbench.methods.rtn.RTN`, asymmetric) into
   :class:`~quantbench.methods.qlinear.IntQuantLinear`: the same packed layout and storage as ``rtn``.

Inputs: each block is calibrated on the outputs of the fp blocks before it (the reference runs the fp
block forward and feeds its outputs on); the activations are subsampled to ``max_tokens`` tokens per
block (seeded by the calibration seed), and ``s_X`` is measured on that subsample.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..kernels.intq import dequantize_codes
from .base import Calibration, ConfigError, Method, ModuleSelection, iter_linears, register
from .gptq import block_output, capture_block_inputs, transformer_blocks
from .quantize import layer_progress
from .rtn import RTN, RTNConfig, rtn_quantize_weight
from .smoothquant import fold_smoothing, mlp_input_norm

log = logging.getLogger(__name__)

#: the llama-style sub-modules AWQ needs in every decoder block
REQUIRED = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
#: linears whose weights are not clipped (their outputs meet in q k^T; the reference skips them)
NO_CLIP = ("q_proj", "k_proj")
#: linears searched per output-channel chunk in the clipping search (bounds its memory)
CLIP_CHUNK = 64


@dataclass(frozen=True)
class AWQConfig(ModuleSelection):
    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    max_tokens: int = 4096
    clip_tokens: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"awq: bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"awq: group_size must be in 1..{1 << 20} or -1 (per channel), got {self.group_size}")
        if not 1 <= self.n_grid <= 1000:
            raise ConfigError(f"awq: n_grid must be in 1..1000, got {self.n_grid}")
        if not 0.0 <= float(self.max_shrink) < 1.0:
            raise ConfigError(f"awq: max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.max_tokens < 1:
            raise ConfigError(f"awq: max_tokens must be >= 1, got {self.max_tokens}")
        if self.clip_tokens < 1:
            raise ConfigError(f"awq: clip_tokens must be >= 1, got {self.clip_tokens}")


@dataclass
class ScaleGroup:
    """One input shared by ``fcs`` (names inside the block), produced by ``prev`` (a norm or a linear)."""

    name: str
    prev: str
    fcs: list[str]


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scaling groups of a llama-style block; ConfigError naming what a block lacks."""
    missing = [p for p in REQUIRED if not _has(block, p)]
    if missing:
        raise ConfigError(f"awq supports llama-style blocks only; {type(block).__name__} lacks {', '.join(missing)}")
    groups = [
        ScaleGroup("qkv", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ]
    v = cast(nn.Linear, block.get_submodule("self_attn.v_proj"))
    o = cast(nn.Linear, block.get_submodule("self_attn.o_proj"))
    if v.out_features == o.in_features:  # GQA: v's rows do not map one-to-one onto o's columns
        groups.append(ScaleGroup("v_o", "self_attn.v_proj", ["self_attn.o_proj"]))
    groups.append(ScaleGroup("gate_up", mlp_input_norm(block), ["mlp.gate_proj", "mlp.up_proj"]))
    groups.append(ScaleGroup("up_down", "mlp.up_proj", ["mlp.down_proj"]))
    return groups


def _has(mod: nn.Module, path: str) -> bool:
    try:
        mod.get_submodule(path)
    except AttributeError:
        return False
    return True


# --------------------------------------------------------------------------- quantization grid


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` [out, in] through RTN's asymmetric grid (:func:`rtn_quantize_weight`) and back, fp32."""
    codes, scales, zeros = rtn_quantize_weight(w, bits, group_size, sym=False)
    in_f = w.shape[1]
    gs = in_f if group_size == -1 else group_size
    g = torch.arange(in_f, device=w.device) // gs
    return dequantize_codes(codes.float(), scales.float()[:, g], zeros.float()[:, g])


# --------------------------------------------------------------------------- step 1: scales


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = s_X^alpha``, normalized by ``sqrt(max(s) * min(s))`` (``s_X`` clamped at 1e-4)."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, n_grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """The best ``s`` for inputs ``x`` [tokens, in] of linears ``weights`` [out_i, in], its alpha, and the
    loss of each alpha (MSE of the concatenated outputs against the fp outputs)."""
    x = x.float()
    w = torch.cat([t.float() for t in weights], dim=0)
    # mean((x Wq^T - x W^T)^2) = sum_o d_o^T (x^T x) d_o / (tokens * out) with d = Wq - W: the same loss
    # from the inputs' Gram matrix (float64), one [out, in] x [in, in] product per alpha instead of
    # [tokens, in] x [in, out] and no subtraction of two large outputs
    xd = x.double()
    gram = xd.t() @ xd
    denom = x.shape[0] * w.shape[0]
    x_mean = x.abs().mean(dim=0)
    losses: list[float] = []
    best: tuple[float, torch.Tensor, float] | None = None
    for i in range(n_grid):
        alpha = i / n_grid
        s = awq_scales(x_mean, alpha)
        wq = torch.cat([fake_quantize_weight(t.float() * s, bits, group_size) for t in weights], dim=0) / s
        d = (wq - w).double()
        loss = float(((d @ gram) * d).sum() / denom)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, s, alpha)
    assert best is not None  # n_grid >= 1
    return best[1], best[2], losses


@torch.no_grad()
def fold_scales(prev: nn.Module, fcs: list[nn.Linear], s: torch.Tensor) -> None:
    """``X diag(s)^-1`` into ``prev`` (a norm's weight and bias, or a linear's output rows and bias) and
    ``diag(s) W`` into each of ``fcs``: the block computes the same function (exact for RMSNorm)."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        for fc in fcs:
            fc.weight.mul_(s.to(fc.weight.dtype).unsqueeze(0))
    else:
        fold_smoothing(prev, fcs, s)


# --------------------------------------------------------------------------- step 2: clipping


@torch.no_grad()
def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int, max_shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output row, group) clipping bounds (min, max) [out, n_groups] of ``w`` [out, in] that minimize
    the MSE of the group's partial output on ``x`` [tokens, in] after fake quantization."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    ng = -(-in_f // gs)  # a last, shorter group when gs does not divide in_f (as RTN's grid has)
    w, in_f = _pad_groups(w, ng * gs), ng * gs  # padded columns copy the last one: min/max unchanged
    x = torch.nn.functional.pad(x.float(), (0, in_f - x.shape[-1])).reshape(-1, ng, gs)  # zero inputs: no output
    best_lo = torch.empty(out_f, ng, device=w.device)
    best_hi = torch.empty(out_f, ng, device=w.device)
    n_steps = max(1, int(max_shrink * n_grid))
    for o0 in range(0, out_f, CLIP_CHUNK):
        wc = w[o0 : o0 + CLIP_CHUNK].float().reshape(-1, ng, gs)  # [oc, ng, gs]
        ref = torch.einsum("ngk,ogk->nog", x, wc)
        lo0, hi0 = wc.amin(-1, keepdim=True), wc.amax(-1, keepdim=True)
        best_err = torch.full((wc.shape[0], ng), math.inf, device=w.device)
        lo_b, hi_b = lo0.squeeze(-1).clone(), hi0.squeeze(-1).clone()
        for i in range(n_steps):
            r = 1 - i / n_grid
            lo, hi = lo0 * r, hi0 * r
            cw = torch.maximum(torch.minimum(wc, hi), lo).reshape(wc.shape[0], in_f)
            q = fake_quantize_weight(cw, bits, group_size).reshape(-1, ng, gs)
            err = (torch.einsum("ngk,ogk->nog", x, q) - ref).pow(2).mean(0)  # [oc, ng]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            lo_b = torch.where(better, lo.squeeze(-1), lo_b)
            hi_b = torch.where(better, hi.squeeze(-1), hi_b)
        best_lo[o0 : o0 + CLIP_CHUNK], best_hi[o0 : o0 + CLIP_CHUNK] = lo_b, hi_b
    return best_lo, best_hi


@torch.no_grad()
def apply_clip(lin: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, group_size: int) -> None:
    """Clamp ``lin``'s weight per (row, group of ``group_size`` columns) to [lo, hi] [out, n_groups]."""
    w = lin.weight.data
    out_f, in_f = w.shape
    ng = lo.shape[1]
    gs = in_f if group_size == -1 else group_size
    wg = _pad_groups(w, ng * gs).reshape(out_f, ng, gs)
    lo_t, hi_t = lo.to(w.dtype).unsqueeze(-1), hi.to(w.dtype).unsqueeze(-1)
    w.copy_(torch.maximum(torch.minimum(wg, hi_t), lo_t).reshape(out_f, -1)[:, :in_f])


def _pad_groups(w: torch.Tensor, width: int) -> torch.Tensor:
    """``w`` [out, in] widened to ``width`` columns with copies of its last column (RTN pads its last group so)."""
    pad = width - w.shape[1]
    return torch.cat([w, w[:, -1:].expand(w.shape[0], pad)], dim=1) if pad else w


# --------------------------------------------------------------------------- method


@register
class AWQ(Method):
    """AWQ (Lin et al., 2024): activation-aware per-channel scales and clipping, then RTN int4 g128."""

    name = "awq"
    config_cls = AWQConfig
    needs_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: Calibration | None) -> nn.Module:
        c: AWQConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ConfigError("awq needs calibration data")
        t0 = time.perf_counter()
        selected = {n for n, _ in iter_linears(model, c.include, c.exclude)}
        try:
            prefix, blocks = transformer_blocks(model)
        except ValueError as e:
            raise ConfigError(f"awq: {e}") from e
        groups = [scale_groups(b) for b in blocks]  # checks every block before anything changes
        was_training = model.training
        model.eval()
        inps, kws = capture_block_inputs(model, blocks[0], calib)
        n_tok = sum(int(x.numel() // x.shape[-1]) for x in inps)
        gen = torch.Generator(device="cpu").manual_seed(calib.seed)  # drawn on the CPU: the same rows everywhere
        alphas: dict[str, float] = {}
        clipped = 0
        for b, block in enumerate(layer_progress(blocks, desc="awq", unit="block")):
            bname = f"{prefix}.{b}"
            names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{bname}.{n}" in selected]
            feats, inps = self._block_features(block, inps, kws, names, c.max_tokens, n_tok, gen)
            for g in groups[b]:
                if not g.fcs or any(n not in feats for n in g.fcs):
                    continue  # a linear of the group is not quantized: leave the group as it is
                fcs = [cast(nn.Linear, block.get_submodule(n)) for n in g.fcs]
                x = feats[g.fcs[0]]
                s, alpha, _ = search_scale(x, [fc.weight for fc in fcs], c.bits, c.group_size, c.n_grid)
                fold_scales(block.get_submodule(g.prev), fcs, s)
                for n in g.fcs:  # the recorded inputs now reach the fcs divided by s
                    feats[n] = feats[n] / s
                alphas[f"{bname}.{g.name}"] = alpha
            if c.clip:
                for n in names:
                    if n.rsplit(".", 1)[-1] in NO_CLIP:
                        continue
                    lin = cast(nn.Linear, block.get_submodule(n))
                    x = feats[n]
                    x = x[:: max(1, x.shape[0] // c.clip_tokens)][: c.clip_tokens]  # spread over the samples
                    lo, hi = search_clip(lin.weight, x, c.bits, c.group_size, c.n_grid, c.max_shrink)
                    apply_clip(lin, lo, hi, c.group_size)
                    clipped += 1
        model.train(was_training)
        rtn = RTN(RTNConfig(bits=c.bits, group_size=c.group_size, sym=False, include=c.include, exclude=c.exclude))
        model = rtn.quantize(model, None)
        self.artifacts.update(
            quantized_modules=rtn.artifacts["quantized_modules"],
            alphas=alphas,
            scaled_groups=len(alphas),
            clipped_modules=clipped,
            quantize_seconds=time.perf_counter() - t0,
        )
        log.info("awq: %d groups scaled, %d linears clipped", len(alphas), clipped)
        return model

    @staticmethod
    def _block_features(
        block: nn.Module, inps: list[torch.Tensor], kws: list[dict[str, Any]], names: list[str],
        max_tokens: int, n_tok: int, gen: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The inputs [tokens, in] of the named linears on a seeded subsample of at most ``max_tokens``
        tokens (the same tokens for every linear), and the fp block's outputs (the next block's inputs)."""
        keep = min(1.0, max_tokens / max(n_tok, 1))
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        rows: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long, device="cpu")]

        def make_hook(n: str):
            def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                feats[n].append(x[rows[0]].float())
            return hook

        handles = [block.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
        outs = []
        try:
            for x, kw in zip(inps, kws):
                t = int(x.numel() // x.shape[-1])
                k = max(1, min(t, round(t * keep)))
                rows[0] = torch.randperm(t, generator=gen, device="cpu")[:k].sort().values.to(x.device)
                outs.append(block_output(block(x, **kw)))
        finally:
            for h in handles:
                h.remove()
        return {n: torch.cat(v)[:max_tokens] for n, v in feats.items()}, outs
