"""Keep a model's transformer blocks on disk and bring one into memory at a time.

This is the GPTQ reference's recipe for models larger than one device (OPT-175B on one GPU):
block-wise algorithms touch one block at a time, so only that block's weights need to be resident.
Each block's state is written to its own safetensors file, its tensors are moved to the ``meta``
device (no storage), and :meth:`BlockStore.load` materializes a block again before it is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers that hold real storage (not on ``meta``)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
               if t.device.type != "meta")


class BlockStore:
    def __init__(self, blocks: nn.ModuleList, directory: Path, device: str | torch.device | None = None) -> None:
        if device is None:  # where the blocks are now: a model loaded on a GPU gets its blocks back there
            device = next((t.device for b in blocks for t in [*b.parameters(), *b.buffers()]), torch.device("cpu"))
        self.blocks, self.dir, self.device = blocks, Path(directory), str(device)
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, block in enumerate(blocks):
            sd = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
            save_file(sd, str(self.path(i)))
            block.to_empty(device="meta")
        log.info("offloaded %d blocks to %s", len(blocks), self.dir)

    def path(self, i: int) -> Path:
        return self.dir / f"block{i:04d}.safetensors"

    def load(self, i: int) -> nn.Module:
        block = self.blocks[i]
        block.to_empty(device=self.device)
        block.load_state_dict(load_file(str(self.path(i)), device=self.device))
        return block

    def resident_block_bytes(self) -> int:
        return sum(resident_bytes(b) for b in self.blocks)
