"""Where a model runs: the one rule every calibration pass, measurement and decode loop uses to place its inputs."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters): calibration tokens,
    windows and prompts are built on the CPU and moved here before they are fed to the model."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
