"""Perplexity protocols, and KL divergence / top-1 agreement against the unquantized model.

Protocols (DESIGN.md):
- ``gptq``: the test text joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
  ``seq_len`` (tail dropped); every token of a window but the first is predicted;
  ppl = exp(total NLL / predicted tokens).
- ``sliding``: windows of ``seq_len`` every ``stride`` tokens; each window scores only the tokens no
  earlier window scored (the first window scores all its predictable tokens).

The reference (unquantized) model's outputs at the scored positions are written once per (model,
eval spec) to a compact store on disk (:class:`Reference`); each cell streams them back window by
window, so the statistics against the reference (:class:`EvalStats`: KL(P_ref || P_q) and its
percentiles, Δp, top-1 agreement, ln(PPL_q / PPL_ref)) never hold the logits of the whole run in
memory, and come from the same single pass as perplexity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...methods.base import ConfigError
from ...methods.placement import model_device

log = logging.getLogger(__name__)

PROTOCOLS = ("gptq", "sliding")

#: the reference store's format; part of :meth:`Reference.key`, so a store of another format is never read
REFERENCE_FORMAT = "u16-logprob-v1"
#: uint16 codes per log-prob: 0 .. U16_MAX
U16_MAX = 65535


@dataclass
class Window:
    input_ids: torch.Tensor  # [seq_len]
    score_from: int  # positions >= score_from (in input_ids) are scored as targets


@dataclass
class EvalData:
    windows: list[Window]
    protocol: dict[str, Any]
    #: windows per forward pass (:func:`evaluate`); not part of the protocol: it changes no value beyond the
    #: GEMM blocking of a batched forward (<= 1e-6 relative, tests/harness/test_evaluate.py)
    batch_size: int = 1

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
    batch_size: int = 1,
) -> EvalData:
    windows = make_windows(ids, protocol, seq_len, stride, max_windows)
    proto: dict[str, Any] = {"name": protocol, "dataset": dataset, "split": "test", "seq_len": seq_len}
    if protocol == "sliding":
        proto["stride"] = stride or seq_len
    data = EvalData(windows, proto, _check_batch_size(batch_size))
    proto["windows"] = len(windows)
    proto["tokens"] = data.n_scored
    proto["text_sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return data


def _check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class _Workspace:
    """float32 [T, V] buffers reused from window to window: a fresh 200 MB tensor per step costs its page
    faults (a log-softmax into a reused buffer takes half the time of one into a new tensor)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            self._bufs[name] = buf = torch.empty(shape, dtype=torch.float32, device="cpu")
        return buf


def _forward_windows(model: nn.Module, windows: list[Window], batch_size: int = 1, desc: str = "eval"
                     ) -> Iterator[tuple[int, Window, torch.Tensor]]:
    """``(index, window, logits [len, V])`` of each window in order; the model runs ``batch_size`` windows
    of equal length per forward (consecutive ones; a shorter last window of the sliding protocol goes alone).
    A batched forward scores each window as one alone does (causal attention, no padding)."""
    dev = model_device(model)  # a model loaded on a GPU (--device) reads its inputs there
    # a transformers model builds no KV cache for a one-shot forward (the same logits, bit for bit: tested on
    # smollm2-135m; the eval path of the KV methods quantizes in k_proj/v_proj wrappers, not in a cache)
    kw = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    bar = tqdm(total=len(windows), desc=desc, leave=False, disable=None)
    i = 0
    while i < len(windows):
        n = windows[i].input_ids.numel()
        j = i + 1
        while j < len(windows) and j - i < batch_size and windows[j].input_ids.numel() == n:
            j += 1
        ids = torch.stack([w.input_ids for w in windows[i:j]])
        with torch.inference_mode():
            out = model(ids.to(dev), **kw)
        logits = out.logits if hasattr(out, "logits") else out
        for k in range(i, j):
            yield k, windows[k], logits[k - i]
            bar.update(1)
        del out, logits
        i = j
    bar.close()


def _window_logprobs(logits: torch.Tensor, w: Window, ws: _Workspace | None = None) -> torch.Tensor:
    """log-softmax over the vocabulary at the positions that predict the scored targets: [T, V] float32 on
    the CPU, from one window's ``logits`` [len, V] (into ``ws``'s buffer when given: overwritten next window)."""
    x = logits[w.score_from - 1 : -1].float()
    if ws is None or x.device.type != "cpu":
        return F.log_softmax(x, dim=-1).cpu()
    return torch.log_softmax(x, dim=-1, out=ws.get("lp", tuple(x.shape)))


def _logprobs(model: nn.Module, w: Window) -> torch.Tensor:
    """log-softmax over the vocabulary at the positions that predict the scored targets: [T, V]."""
    ((_, _, logits),) = list(_forward_windows(model, [w]))
    return _window_logprobs(logits, w)


def _cat(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.zeros(0)


#: percentile interpolation of every per-token statistic (numpy's default; llama.cpp's ``percentile`` too)
PERCENTILE_METHOD: Final = "linear"


def percentile(x: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of ``x``, linear interpolation between order statistics."""
    return float(np.percentile(x, q, method=PERCENTILE_METHOD))


def mean_stderr(x: np.ndarray) -> float:
    """std(x, ddof=1) / sqrt(n): the tokens taken as independent samples (as llama.cpp does)."""
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


@dataclass
class EvalStats:
    """One evaluation pass: the sums the published values come from, and the per-token values of one
    cell (float64, a few MB for the default eval's 8k tokens) its spreads and percentiles come from."""

    nll_sum: float = 0.0
    n_tokens: int = 0
    kl_sum: float = 0.0
    top1_sum: int = 0
    has_reference: bool = False
    per_window_nll: list[float] = field(default_factory=list)
    tok_nll: list[torch.Tensor] = field(default_factory=list)  # per window: -log p_q(target)
    tok_ref_nll: list[torch.Tensor] = field(default_factory=list)  # per window: -log p_ref(target)
    tok_kl: list[torch.Tensor] = field(default_factory=list)  # per window: KL(P_ref || P_q) per position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def kl(self) -> float:
        return self.kl_sum / self.n_tokens

    @property
    def top1(self) -> float:
        return self.top1_sum / self.n_tokens

    def token_nll(self) -> np.ndarray:
        return _cat(self.tok_nll)

    def token_kl(self) -> np.ndarray:
        return _cat(self.tok_kl)

    def token_ref_nll(self) -> np.ndarray:
        return _cat(self.tok_ref_nll)

    def token_delta_p(self) -> np.ndarray:
        """Δp = p_q(target) − p_ref(target) per token (a fraction, not %)."""
        return np.exp(-self.token_nll()) - np.exp(-self.token_ref_nll())

    def token_nll_diff(self) -> np.ndarray:
        """nll_q − nll_ref per token: the paired samples of ln(PPL_q / PPL_ref)."""
        return self.token_nll() - self.token_ref_nll()

    def perplexity_stderr(self) -> float:
        """Delta-method stderr of ppl from the per-token NLLs: ppl * std(nll) / sqrt(n)."""
        nll = self.token_nll()
        if nll.size < 2:
            return float("nan")
        return float(self.perplexity * mean_stderr(nll))

    def kl_stderr(self) -> float:
        return mean_stderr(self.token_kl())

    def top1_stderr(self) -> float:
        """Binomial stderr sqrt(p(1-p)/(n-1)) (llama.cpp's for "Same top p")."""
        p, n = self.top1, self.n_tokens
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


class Reference:
    """The unquantized model's outputs at the scored positions of an EvalData, in a directory:

    - ``logprobs.npy``: uint16 [N, V]; per token, log-prob ``lp ≈ lo + code * step`` with
      ``lo = min_v lp``, ``step = (max_v lp − lo) / 65535`` (llama.cpp's ``--kl-divergence-base``
      encoding, without its 16-nat clip): every stored log-prob within ``step / 2`` of the float32
      value (:meth:`error_bound`);
    - ``scale.npy``: float32 [N, 2], ``(lo, step)`` per token;
    - ``target_logprob.npy``: float32 [N], the exact log-prob of each target (the reference's per-token
      NLL, for ln(PPL_q / PPL_ref) and Δp);
    - ``argmax.npy``: int64 [N], the exact float32 argmax (top-1 agreement is not moved by rounding ties);
    - ``meta.json``: format, vocab, tokens; written last (a directory without it is incomplete).

    :meth:`window` decodes a window and renormalizes it (log-softmax), so KL is between two distributions;
    a decoded log-prob is then within ``step`` of the float32 one.
    """

    FILES = ("logprobs.npy", "scale.npy", "target_logprob.npy", "argmax.npy")

    def __init__(self, path: Path, data: EvalData, vocab: int) -> None:
        self.path, self.data, self.vocab = Path(path), data, vocab
        self.offsets = np.cumsum([0] + [w.input_ids.numel() - w.score_from for w in data.windows])
        self._arrays: dict[str, np.ndarray] = {}

    @staticmethod
    def key(model_info: dict[str, Any], data: EvalData) -> str:
        blob = json.dumps({"model": model_info.get("sha256") or model_info.get("name"),
                           "params": model_info.get("params"), "dtype": model_info.get("dtype"),
                           "protocol": data.protocol, "format": REFERENCE_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @classmethod
    def open(cls, path: Path, data: EvalData) -> Reference | None:
        """A complete store of this format at ``path`` for ``data``, or None (absent, partial, other format)."""
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != REFERENCE_FORMAT or meta.get("tokens") != data.n_scored:
            return None
        return cls(path, data, int(meta["vocab"]))

    @classmethod
    def load_or_build(cls, model: nn.Module, model_info: dict[str, Any], data: EvalData, cache: Path) -> Reference:
        """The cached store for (model, data) under ``cache``, built (one pass of ``model``) when missing."""
        path = Path(cache) / cls.key(model_info, data)
        ref = cls.open(path, data)
        if ref is not None:
            return ref
        log.info("building the unquantized reference on %d windows", len(data.windows))
        return cls.build(model, data, path)[0]

    @staticmethod
    def encode(lp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint16 codes [T, V] and (lo, step) [T, 2] of float32 log-probs [T, V] (round to nearest)."""
        lp = lp.float()
        lo = lp.min(-1, keepdim=True).values
        step = (lp.max(-1, keepdim=True).values - lo) / U16_MAX
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((lp - lo) / safe).clamp_(0, U16_MAX).to(torch.int32)
        return codes.numpy().astype(np.uint16), torch.cat([lo, step], -1).numpy()

    @staticmethod
    def decode(codes: np.ndarray, scale: np.ndarray) -> torch.Tensor:
        """float32 log-probs [T, V] from :meth:`encode`'s output (not renormalized)."""
        s = torch.from_numpy(np.asarray(scale, dtype=np.float32))
        return s[:, :1] + torch.from_numpy(np.asarray(codes).astype(np.float32)) * s[:, 1:]

    @classmethod
    def build(cls, model: nn.Module, data: EvalData, path: Path) -> tuple[Reference, EvalStats]:
        """Run the reference model once; write its store; return its own stats too."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: two runs may build the same key
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        n = data.n_scored
        offsets = np.cumsum([0] + [w.input_ids.numel() - w.score_from for w in data.windows])
        stats = EvalStats()
        arrays: dict[str, Any] = {}
        vocab = 0
        ws = _Workspace()
        for i, w, logits in _forward_windows(model, data.windows, data.batch_size, "reference"):
            with torch.inference_mode():
                lp = _window_logprobs(logits, w, ws)
            del logits
            if not arrays:
                vocab = lp.shape[-1]
                shapes = {"logprobs.npy": ((n, vocab), np.uint16), "scale.npy": ((n, 2), np.float32),
                          "target_logprob.npy": ((n,), np.float32), "argmax.npy": ((n,), np.int64)}
                arrays = {f: np.lib.format.open_memmap(tmp / f, mode="w+", dtype=dt, shape=sh)
                          for f, (sh, dt) in shapes.items()}
            a, b = offsets[i], offsets[i + 1]
            codes, scale = cls.encode(lp)
            targets = w.input_ids[w.score_from :]
            arrays["logprobs.npy"][a:b] = codes
            arrays["scale.npy"][a:b] = scale
            arrays["target_logprob.npy"][a:b] = lp.gather(1, targets.unsqueeze(1)).squeeze(1).numpy()
            arrays["argmax.npy"][a:b] = lp.argmax(-1).numpy()
            _accumulate_nll(stats, lp, w)
        for arr in arrays.values():
            arr.flush()
        del arrays
        meta = {"format": REFERENCE_FORMAT, "vocab": vocab, "tokens": n, "windows": len(data.windows),
                "encoding": "uint16 per log-prob, per-token lo = min, step = (max - min) / 65535, round to nearest"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(path, ignore_errors=True)  # an older or partial store at this path
        tmp.replace(path)
        return cls(path, data, vocab), stats

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:  # opened once, not per window
            self._arrays[name] = np.load(self.path / name, mmap_mode="r")
        return self._arrays[name]

    def _slice(self, name: str, i: int) -> np.ndarray:
        return np.array(self._array(name)[self.offsets[i] : self.offsets[i + 1]])

    def raw_window(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Window ``i``'s stored log-probs [T, V] as decoded (within :meth:`error_bound` of float32); into
        ``out`` (float32 [T, V]) when given. The codes are converted straight from the memory map, then
        scaled in place: the same float32 operations, and so the same bits, as :meth:`decode`."""
        a, b = self.offsets[i], self.offsets[i + 1]
        codes = self._array("logprobs.npy")[a:b]
        if out is None:
            out = torch.empty(codes.shape, dtype=torch.float32, device="cpu")  # numpy interop
        np.copyto(out.numpy(), codes, casting="unsafe")  # uint16 -> float32, exact
        s = torch.from_numpy(self._slice("scale.npy", i).astype(np.float32, copy=False))
        return out.mul_(s[:, 1:]).add_(s[:, :1])

    def window(self, i: int, ws: _Workspace | None = None) -> torch.Tensor:
        """Window ``i``'s log-probs [T, V], decoded and renormalized (into ``ws``'s buffer when given)."""
        if ws is None:
            return F.log_softmax(self.raw_window(i), dim=-1)
        n = int(self.offsets[i + 1] - self.offsets[i])
        raw = self.raw_window(i, ws.get("ref_raw", (n, self.vocab)))
        return torch.log_softmax(raw, dim=-1, out=ws.get("ref", (n, self.vocab)))

    def error_bound(self, i: int) -> torch.Tensor:
        """Per token of window ``i``: the largest |stored − float32| log-prob, ``step / 2`` plus the float32
        rounding of encoding and decoding (4 float32 epsilons of ``|lo|``, the largest magnitude)."""
        s = self._slice("scale.npy", i).astype(np.float64)
        return torch.from_numpy(s[:, 1] / 2 + 4 * float(np.finfo(np.float32).eps) * np.abs(s[:, 0]))

    def target_logprob(self, i: int) -> torch.Tensor:
        """Window ``i``: the exact (float32) reference log-prob of each target."""
        return torch.from_numpy(self._slice("target_logprob.npy", i))

    def argmax(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._slice("argmax.npy", i))

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.FILES)


def _accumulate_nll(stats: EvalStats, lp: torch.Tensor, w: Window) -> None:
    targets = w.input_ids[w.score_from :]
    nll = -lp.gather(1, targets.unsqueeze(1)).squeeze(1).double()
    stats.nll_sum += float(nll.sum())
    stats.n_tokens += int(nll.numel())
    stats.per_window_nll.append(float(nll.mean()))
    stats.tok_nll.append(nll)


def _finite(lp: torch.Tensor) -> bool:
    """Whether every log-prob of a log-softmax output is finite, in one read: its minimum is NaN when one
    is NaN and -inf when one is -inf (a log-softmax gives +inf nowhere: an infinite logit makes NaNs)."""
    return bool(torch.isfinite(lp.amin()))


def _kl_rows(lp: torch.Tensor, ref: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """KL(P_ref || P_q) per row, float32: ``F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1)``
    (``exp(ref) * (ref - lp)`` per element, summed along the row) with the same float32 operations, and so
    the same bits, in reused buffers. Overwrites ``ref`` (with ``exp(ref)``)."""
    d = torch.sub(ref, lp, out=ws.get("kl", tuple(lp.shape)))
    return d.mul_(ref.exp_()).sum(-1)


def evaluate(model: nn.Module, data: EvalData, reference: Reference | None = None,
             desc: str = "eval", batch_size: int | None = None) -> EvalStats:
    """Perplexity of ``model`` on ``data``; the statistics against the reference when one is given.

    ``batch_size`` windows per forward (default ``data.batch_size``); each window is scored as it is alone."""
    stats = EvalStats(has_reference=reference is not None)
    bs = _check_batch_size(data.batch_size if batch_size is None else batch_size)
    ws = _Workspace()
    for i, w, logits in _forward_windows(model, data.windows, bs, desc):
        with torch.inference_mode():
            lp = _window_logprobs(logits, w, ws)
            del logits
            if not _finite(lp):
                raise FloatingPointError(f"non-finite logits in window {i}")
            _accumulate_nll(stats, lp, w)
            if reference is not None:
                top1 = lp.argmax(-1)
                ref = reference.window(i, ws)
                if ref.shape != lp.shape:
                    raise ValueError(f"reference window {i} has shape {tuple(ref.shape)}, "
                                     f"model gives {tuple(lp.shape)}")
                kl = _kl_rows(lp, ref, ws).double()
                stats.kl_sum += float(kl.sum())
                stats.tok_kl.append(kl)
                stats.top1_sum += int((reference.argmax(i) == top1).sum())
                stats.tok_ref_nll.append(-reference.target_logprob(i).double())
    return stats
