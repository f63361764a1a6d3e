"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): sequential, Hessian-aware weight quantization.

The wiring around the per-layer solver (:mod:`quantbench.methods.gptq_solver`), as the paper's
reference runs it:
1. capture the inputs of the first transformer block for every calibration sample;
2. for each block in order, and inside it for each ``true_sequential`` group of linears
   (llama: q/k/v, o, gate/up, down; OPT: q/k/v, out_proj, fc1, fc2): accumulate each linear's
   ``H = 2 X X^T / n`` in fp32 from its real inputs, run the solver, write the quantized weight back
   so the next group sees it;
3. run the quantized block once more: its outputs are the next block's inputs;
4. replace the block's linears with :class:`~quantbench.methods.qlinear.IntQuantLinear` (packed codes).
Embeddings and lm_head stay unquantized.  A per-module plan (``quantize(model, calib, plan=...)``,
``{module: (bits, group_size)}``) gives modules their own grid; mixed precision runs GPTQ through it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    register,
    set_module,
)
from .gptq_solver import gptq_quantize
from .offload import BlockStore
from .placement import model_device
from .qlinear import IntQuantLinear
from .quantize import ModulePlan, module_configs

log = logging.getLogger(__name__)

#: true_sequential order inside a block, by the linear's last name component
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj", "out_proj"),
    ("gate_proj", "up_proj", "fc1"),
    ("down_proj", "fc2"),
)


@dataclass(frozen=True)
class GPTQConfig(ModuleSelection):
    bits: int = 4
    group_size: int = 128  # -1: one grid per output channel
    sym: bool = False
    act_order: bool = True
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    mse: bool = False
    # which weights a group's grid is fitted on when group_size < blocksize (see gptq_quantize):
    # "reference" (the reference implementation), "updated" (all earlier columns' feedback applied)
    group_grid: str = "reference"
    offload: bool = False  # keep fp blocks on disk (safetensors), one in memory at a time

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("gptq", "bits", self.bits, (2, 3, 4, 8))
        check_choice("gptq", "group_grid", self.group_grid, ("reference", "updated"))
        if self.group_size != -1 and not 0 < self.group_size <= 1 << 20:
            raise ConfigError(f"gptq: group_size must be in 1..{1 << 20} or -1 (per channel), got {self.group_size}")
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"gptq: percdamp must be in [0, 1), got {self.percdamp}")
        if not 0 < self.blocksize <= 1 << 20:
            raise ConfigError(f"gptq: blocksize must be in 1..{1 << 20}, got {self.blocksize}")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks (llama: ``model.layers``; OPT: ``model.decoder.layers``)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise ValueError("gptq: no list of transformer blocks found in the model")


class _Captured(Exception):
    pass


def capture_block_inputs(
    model: nn.Module, block: nn.Module, calib: Calibration
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs (hidden states and keyword arguments) of ``block`` for each calibration sample.

    A pre-hook on the block records its arguments and stops the forward (the reference's trick).
    """
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        hs = args[0] if args else kw.pop("hidden_states")
        inputs.append(hs.detach())
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
        kwargs.append(kw)
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    dev = model_device(model)  # the calibration tokens live on the CPU
    try:
        for tokens in calib.batches(1):
            try:
                model(tokens.to(dev), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (HF blocks return a tuple or the tensor itself)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def sequential_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    groups, left = [], list(names)
    for suffixes in SEQUENTIAL_GROUPS:
        g = [n for n in left if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            left = [n for n in left if n not in g]
    if left:
        groups.append(left)
    return groups


@register
class GPTQ(Method):
    """GPTQ (Frantar et al., 2022): OBQ's column-wise error compensation, sequential over blocks."""

    name = "gptq"
    config_cls = GPTQConfig
    needs_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: Calibration | None, plan: ModulePlan | None = None) -> nn.Module:
        """Quantize the selected linears; ``plan`` gives modules their own (bits, group_size) (None: skip)."""
        c: GPTQConfig = self.config  # type: ignore[assignment]
        if calib is None:
            raise ConfigError("gptq needs calibration data")
        t0 = time.perf_counter()
        configs = module_configs(c, (name for name, _ in iter_linears(model, c.include, c.exclude)), plan, "gptq")
        prefix, blocks = transformer_blocks(model)
        was_training = model.training
        model.eval()
        inps, kws = capture_block_inputs(model, blocks[0], calib)
        layer_losses: dict[str, float] = {}
        layer_seconds: dict[str, float] = {}  # per-linear solve time (suites/obq.yaml compares it with OBQ's)
        store = None
        tmp = None
        if c.offload:
            tmp = tempfile.TemporaryDirectory(prefix="gptq-offload-",
                                              dir=str(self.artifact_dir) if self.artifact_dir else None)
            store = BlockStore(blocks, Path(tmp.name))
        max_resident = 0
        # the last block holding a selected linear: later blocks need neither Hessians nor inputs (without
        # offloading, whose store must visit every block, the loop stops there; the weights are the same)
        last = max((b for b in range(len(blocks)) if any(k.startswith(f"{prefix}.{b}.") for k in configs)), default=-1)
        for b, block in enumerate(tqdm(blocks, desc="gptq", leave=False, disable=None, unit="block")):
            if b > last and store is None:
                break
            if store is not None:
                store.load(b)
                max_resident = max(max_resident, store.resident_block_bytes())
            bname = f"{prefix}.{b}"
            names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{bname}.{n}" in configs]
            results = {}
            for group in sequential_groups(names, c.true_sequential):
                Hs = self._accumulate_hessians(block, group, inps, kws)
                for n in group:
                    lin: nn.Linear = block.get_submodule(n)
                    mc = configs[f"{bname}.{n}"]
                    t1 = time.perf_counter()
                    r = gptq_quantize(
                        lin.weight.data,
                        Hs[n],
                        mc.bits,
                        mc.group_size,
                        mc.sym,
                        mc.act_order,
                        mc.static_groups,
                        mc.percdamp,
                        mc.blocksize,
                        mc.mse,
                        mc.group_grid,
                    )
                    layer_seconds[f"{bname}.{n}"] = time.perf_counter() - t1
                    lin.weight.data.copy_(r.Q.to(lin.weight.dtype))
                    layer_losses[f"{bname}.{n}"] = float(r.losses.sum())
                    results[n] = r
            # outputs of the quantized block are the next block's inputs
            if b < last or store is not None:
                inps = [block_output(block(x, **kw)) for x, kw in zip(inps, kws)]
            for n, r in results.items():
                lin = block.get_submodule(n)
                mc = configs[f"{bname}.{n}"]
                q = IntQuantLinear.from_codes(
                    r.codes,
                    r.scales,
                    r.zeros,
                    mc.bits,
                    mc.group_size,
                    g_idx=r.g_idx,
                    bias=None if lin.bias is None else lin.bias.data.clone(),
                    sym=mc.sym,
                )
                set_module(block, n, q)
            if store is not None:
                max_resident = max(max_resident, store.resident_block_bytes())
        if tmp is not None:
            tmp.cleanup()
        model.train(was_training)
        model.gptq_config = c.to_dict()  # type: ignore[assignment]  # read by gptq_export for quantize_config.json
        losses = list(layer_losses.values())
        self.artifacts.update(
            quantized_modules=len(losses),
            quantize_seconds=time.perf_counter() - t0,
            calibration_samples=int(calib.tokens.shape[0]),
            calibration_seq_len=int(calib.tokens.shape[1]),
            gptq_loss_mean=sum(losses) / max(len(losses), 1),
            gptq_loss_max=max(losses, default=0.0),
            gptq_loss_worst_layer=max(layer_losses, key=lambda n: layer_losses[n]) if losses else None,
            layer_losses=layer_losses,
            layer_seconds=layer_seconds,
        )
        if store is not None:
            # fp block bytes ever resident at once: one block (plus the quantized blocks before it)
            self.artifacts["offload_max_resident_block_bytes"] = max_resident
        log.info("gptq: %d linears in %.1f s", len(losses), self.artifacts["quantize_seconds"])
        return model

    @staticmethod
    def _accumulate_hessians(
        block: nn.Module, names: list[str], inps: list[torch.Tensor], kws: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """H = 2 X X^T / n for each named linear, as a running average over calibration tokens (fp32).

        Each sample's block forward stops as soon as every named linear has seen its input (a pre-hook
        raises once the last one has): the rest of the block computes nothing these Hessians read, so
        with true-sequential groups most of the block's forwards are cut short; the Hessians are the same
        tensors, bit for bit, as with full forwards.
        """
        H: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}
        handles = []
        seen: set[str] = set()
        # linears fed the very same input tensor (q/k/v, gate/up) share one Hessian: it is accumulated
        # once per sample and the others alias it (bit for bit what each would have accumulated)
        alias: dict[str, str] = {}
        inputs: dict[str, torch.Tensor] = {}

        def make_hook(n: str):
            def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                owner = next((m for m, t in inputs.items() if t is args[0]), None)
                if n in alias or (n not in H and owner is not None):
                    if n not in alias:
                        alias[n] = owner  # type: ignore[assignment]  # first sample: owner found
                    elif alias[n] != owner:
                        raise RuntimeError(f"gptq: {n} and {alias[n]} shared an input tensor, then did not")
                    H[n] = H[alias[n]]
                    seen.add(n)
                    if len(seen) == len(names):
                        raise _Captured
                    return
                inputs[n] = args[0]
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                tokens = x.shape[0]
                if n not in H:
                    H[n] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    count[n] = 0
                H[n] *= count[n] / (count[n] + tokens)
                count[n] += tokens
                x = x * (2 / count[n]) ** 0.5
                H[n] += x.t() @ x
                seen.add(n)
                if len(seen) == len(names):
                    raise _Captured

            return hook

        for n in names:
            handles.append(block.get_submodule(n).register_forward_pre_hook(make_hook(n)))
        try:
            for x, kw in zip(inps, kws):
                seen.clear()
                inputs.clear()
                try:
                    block(x, **kw)
                except _Captured:
                    pass
        finally:
            for h in handles:
                h.remove()
        return H
