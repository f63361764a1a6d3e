"""Perplexity protocols, and KL divergence / top-1 agreement against the unquantized model.

Protocols (DESIGN.md):
- ``gptq``: the test text joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
  ``seq_len`` (tail dropped); every token of a window but the first is predicted;
  ppl = exp(total NLL / predicted tokens).
- ``sliding``: windows of ``seq_len`` every ``stride`` tokens; each window scores only the tokens no
  earlier window scored (the first window scores all its predictable tokens).

The reference (unquantized) model's log-probabilities at the scored positions are written once per
(model, eval spec) to a float32 memmap on disk; each cell streams them back window by window, so
KL(P_fp || P_q) and top-1 agreement never hold the logits of the whole run in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...methods.base import ConfigError

log = logging.getLogger(__name__)

PROTOCOLS = ("gptq", "sliding")


@dataclass
class Window:
    input_ids: torch.Tensor  # [seq_len]
    score_from: int  # positions >= score_from (in input_ids) are scored as targets


@dataclass
class EvalData:
    windows: list[Window]
    protocol: dict[str, Any]

    @property
    def n_scored(self) -> int:
        return sum(w.input_ids.numel() - w.score_from for w in self.windows)


def make_windows(
    ids: torch.Tensor, protocol: str, seq_len: int, stride: int | None = None, max_windows: int | None = None
) -> list[Window]:
    n = ids.numel()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown perplexity protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
    if n < seq_len:
        raise ConfigError(f"evaluation text has {n} tokens, fewer than seq_len {seq_len}")
    windows: list[Window] = []
    if protocol == "gptq":
        for i in range(n // seq_len):
            windows.append(Window(ids[i * seq_len : (i + 1) * seq_len], 1))
    else:
        stride = stride or seq_len
        if not 0 < stride <= seq_len:
            raise ConfigError(f"sliding protocol needs 0 < stride <= seq_len, got stride {stride}")
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            if end - begin < 2:
                break
            # tokens in [prev_end, end) are new; target position t is input index t - begin
            score_from = max(prev_end - begin, 1)
            windows.append(Window(ids[begin:end], score_from))
            prev_end = end
            if end == n:
                break
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows


def build_eval_data(
    ids: torch.Tensor,
    dataset: str,
    protocol: str = "gptq",
    seq_len: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
) -> EvalData:
    windows = make_windows(ids, protocol, seq_len, stride, max_windows)
    proto: dict[str, Any] = {"name": protocol, "dataset": dataset, "split": "test", "seq_len": seq_len}
    if protocol == "sliding":
        proto["stride"] = stride or seq_len
    data = EvalData(windows, proto)
    proto["windows"] = len(windows)
    proto["tokens"] = data.n_scored
    proto["text_sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return data


def _logprobs(model: nn.Module, w: Window) -> torch.Tensor:
    """log-softmax over the vocabulary at the positions that predict the scored targets: [T, V]."""
    out = model(w.input_ids.unsqueeze(0))
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[0, w.score_from - 1 : -1].float()
    return F.log_softmax(logits, dim=-1)


@dataclass
class EvalStats:
    nll_sum: float = 0.0
    n_tokens: int = 0
    kl_sum: float = 0.0
    top1_sum: int = 0
    has_reference: bool = False
    per_window_nll: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def kl(self) -> float:
        return self.kl_sum / self.n_tokens

    @property
    def top1(self) -> float:
        return self.top1_sum / self.n_tokens

    def perplexity_stderr(self) -> float:
        """Delta-method stderr of ppl from the per-window mean NLLs (windows as samples)."""
        k = len(self.per_window_nll)
        if k < 2:
            return float("nan")
        m = np.asarray(self.per_window_nll)
        return float(self.perplexity * m.std(ddof=1) / math.sqrt(k))


class Reference:
    """Log-probabilities of the unquantized model on an EvalData, as a float32 memmap."""

    def __init__(self, path: Path, data: EvalData, vocab: int) -> None:
        self.path, self.data, self.vocab = path, data, vocab
        self.offsets = np.cumsum([0] + [w.input_ids.numel() - w.score_from for w in data.windows])

    @staticmethod
    def key(model_info: dict[str, Any], data: EvalData) -> str:
        blob = json.dumps({"model": model_info.get("sha256") or model_info.get("name"),
                           "params": model_info.get("params"), "protocol": data.protocol}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @classmethod
    def build(cls, model: nn.Module, data: EvalData, path: Path) -> tuple[Reference, EvalStats]:
        """Run the reference model once; write its log-probs; return its own stats too."""
        path.parent.mkdir(parents=True, exist_ok=True)
        vocab = None
        mm = None
        stats = EvalStats()
        tmp = path.with_suffix(".tmp")
        for i, w in enumerate(tqdm(data.windows, desc="reference", leave=False)):
            with torch.inference_mode():
                lp = _logprobs(model, w)
            if mm is None:
                vocab = lp.shape[-1]
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(data.n_scored, vocab))
                ref = cls(path, data, vocab)
            a, b = ref.offsets[i], ref.offsets[i + 1]
            mm[a:b] = lp.numpy()
            _accumulate_nll(stats, lp, w)
        assert mm is not None and vocab is not None
        mm.flush()
        del mm
        tmp.replace(path)
        return cls(path, data, vocab), stats

    def window(self, i: int) -> torch.Tensor:
        if getattr(self, "_mm", None) is None:  # opened once, not per window
            self._mm = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._mm[self.offsets[i] : self.offsets[i + 1]]))


def _accumulate_nll(stats: EvalStats, lp: torch.Tensor, w: Window) -> None:
    targets = w.input_ids[w.score_from :]
    nll = -lp.gather(1, targets.unsqueeze(1)).squeeze(1).double()
    stats.nll_sum += float(nll.sum())
    stats.n_tokens += int(nll.numel())
    stats.per_window_nll.append(float(nll.mean()))


def evaluate(model: nn.Module, data: EvalData, reference: Reference | None = None,
             desc: str = "eval") -> EvalStats:
    """Perplexity of ``model`` on ``data``; KL and top-1 agreement when a reference is given."""
    stats = EvalStats(has_reference=reference is not None)
    for i, w in enumerate(tqdm(data.windows, desc=desc, leave=False)):
        with torch.inference_mode():
            lp = _logprobs(model, w)
        if not torch.isfinite(lp).all():
            raise FloatingPointError(f"non-finite logits in window {i}")
        _accumulate_nll(stats, lp, w)
        if reference is not None:
            ref = reference.window(i)
            if ref.shape != lp.shape:
                raise ValueError(f"reference window {i} has shape {tuple(ref.shape)}, model gives {tuple(lp.shape)}")
            kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).double()
            stats.kl_sum += float(kl.sum())
            stats.top1_sum += int((ref.argmax(-1) == lp.argmax(-1)).sum())
    return stats
