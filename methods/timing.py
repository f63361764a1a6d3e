"""The one decode timer: greedy decoding through a KV cache, each step timed alone.

The latency metrics (``harness/measure/latency.py``), KV methods' ``generate`` hooks and the KV
decode benchmark (``kvquant.decode_ms_per_token``) all decode through :func:`greedy_decode`.
On CUDA every timed step is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, n_new: int, cache: Any, times: list[float] | None = None
) -> torch.Tensor:
    """Prefill ``input_ids`` into ``cache``, then ``n_new`` greedy steps of one token each.

    Returns the ids with the new tokens appended; each step's seconds (forward and argmax) are
    appended to ``times`` when given.
    """
    dev = input_ids.device
    out = model(input_ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    ids = input_ids
    for _ in range(n_new):
        ids = torch.cat([ids, nxt], 1)
        sync(dev)
        t = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync(dev)
        if times is not None:
            times.append(time.perf_counter() - t)
    return ids
