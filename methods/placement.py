"""Where a model runs: the one rule every calibration pass, measurement and decode loop uses to place its inputs."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters): calibration tokens,
    windows and prompts are built on the CPU and moved here before they are fed to the model."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def forward_for_hooks(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Run ``model`` on ``input_ids`` for what its hooks record, not for its logits: where the forward takes
    transformers' ``logits_to_keep``, the output projection runs on the last position only (on a 49k-token
    vocabulary about a fifth of a small model's FLOPs per token).  The decoder blocks, and so every activation
    a hook on them sees, are computed exactly as by ``model(input_ids)``; only a hook on the output projection
    itself would see less, so callers hooking it must call the model directly."""
    try:
        model(input_ids, logits_to_keep=1)
    except TypeError as e:  # a forward without logits_to_keep (custom models): all positions
        if "logits_to_keep" not in str(e):
            raise
        model(input_ids)
