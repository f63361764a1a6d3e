"""Per-module sensitivity: the KL / perplexity increase when ONLY one module is quantized.

One shared base model; for each module (each linear of each block, plus the input embeddings and
the lm_head) its weight is swapped for a fake-quantized copy (group-wise RTN on the uniform grid of
:mod:`quantbench.kernels.intq`, the grid :class:`~quantbench.methods.qlinear.IntQuantLinear`
stores), the model is evaluated on a small token budget, and the original weight object is put
back (the model is restored exactly; tied weights stay tied).

Efficiency: the unquantized inputs of every transformer block are cached once per window, so a
module in block ``l`` costs only blocks ``l..L-1`` plus the final norm and lm_head (about half a
forward on average); the unquantized log-probabilities are held in memory.  Results are cached on
disk in ``cache_dir()/sensitivity/<key>.json``, keyed by a fingerprint of the model's weights
(:func:`~quantbench.methods.base.model_fingerprint` with ``exact=False``), the
bits, group size, quantizer and the exact tokens, and written as they are measured (an interrupted
run resumes).

``quantbench sensitivity --out DIR`` writes ``DIR/sensitivity.json`` (layer x projection KL, the
format :func:`quantbench.harness.report.publish.plot_sensitivity` reads) and a heatmap (PNG + SVG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .base import Calibration, ConfigError, cache_dir, iter_linears, model_fingerprint
from .gptq import block_output, capture_block_inputs, transformer_blocks
from .gptq_solver import gptq_quantize
from .placement import model_device
from .rtn import rtn_quantize_weight

log = logging.getLogger(__name__)

SCHEMA = 1
EMBEDDINGS = "embeddings"
LM_HEAD = "lm_head"


# --------------------------------------------------------------------------- quantizers


def rtn_fake_quantize(w: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> torch.Tensor:
    """The dequantized weight RTN (asymmetric min-max grid, fp16 scales, per group of inputs) produces."""
    codes, scales, zeros = rtn_quantize_weight(w, bits, group_size, sym)
    in_f = w.shape[1]
    gs = in_f if group_size == -1 else group_size
    g = torch.arange(in_f, device=w.device) // gs
    return ((codes.float() - zeros[:, g]) * scales[:, g]).to(w.dtype)


class GPTQFakeQuantize:
    """The dequantized weight GPTQ produces for one module quantized ALONE (``name`` picks its Hessian).

    The scoring-time stand-in for GPTQ as mixed precision's inner quantizer: the solver of
    :func:`~quantbench.methods.gptq_solver.gptq_quantize` with the inner quantizer's settings, against
    ``H = 2 X X^T / n`` of the module's inputs in the UNQUANTIZED model (:func:`module_hessians`).  The
    one approximation: the real sequential GPTQ sees inputs already perturbed by the quantized modules
    before it, which depend on the allocation being chosen.
    """

    needs_name = True

    def __init__(self, hessians: dict[str, torch.Tensor], **gptq_kwargs: Any) -> None:
        self.hessians = hessians
        self.kwargs = {"sym": False, "act_order": False, **gptq_kwargs}

    def __call__(self, w: torch.Tensor, bits: int, group_size: int, name: str) -> torch.Tensor:
        return gptq_quantize(w, self.hessians[name], bits, group_size, **self.kwargs).Q.to(w.dtype)


def _quantize(fn: Callable[..., torch.Tensor], name: str, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``fn(w, bits, group_size)``, plus ``name=`` for per-module quantizers (``needs_name``)."""
    if getattr(fn, "needs_name", False):
        return fn(w, bits, group_size, name=name)
    return fn(w, bits, group_size)


@torch.no_grad()
def module_hessians(model: nn.Module, windows: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``H = 2 X X^T / n`` (fp32) of each named linear's inputs over ``windows`` [n, T], one forward each."""
    names = list(names)
    H: dict[str, torch.Tensor] = {}
    count: dict[str, int] = dict.fromkeys(names, 0)

    def hook(n: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        H[n] = H.get(n, torch.zeros(x.shape[1], x.shape[1], device=x.device)).add_(x.t() @ x)
        count[n] += x.shape[0]

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n in names]
    windows = windows.to(model_device(model))
    try:
        for w in range(windows.shape[0]):
            model(windows[w : w + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: h.mul_(2 / count[n]) for n, h in H.items()}


# --------------------------------------------------------------------------- model anatomy


def module_table(model: nn.Module, embeddings: bool = True, lm_head: bool = True) -> list[dict[str, Any]]:
    """Every measurable module: {name, layer, projection, kind, weight shape} in model order."""
    prefix, blocks = transformer_blocks(model)
    rows: list[dict[str, Any]] = []
    if embeddings:
        emb = model.get_input_embeddings()  # type: ignore[operator]  # HF model attribute on nn.Module
        rows.append(
            {
                "name": _qualname(model, emb),
                "layer": None,
                "projection": EMBEDDINGS,
                "kind": "embedding",
                "shape": list(emb.weight.shape),
            }
        )
    for name, lin in iter_linears(model):
        if not name.startswith(prefix + "."):
            continue
        layer = int(name[len(prefix) + 1 :].split(".", 1)[0])
        rows.append(
            {
                "name": name,
                "layer": layer,
                "projection": name.rsplit(".", 1)[-1],
                "kind": "linear",
                "shape": list(lin.weight.shape),
            }
        )
    if lm_head:
        head = model.get_output_embeddings()  # type: ignore[operator]  # HF model attribute on nn.Module
        if head is not None:
            rows.append(
                {
                    "name": _qualname(model, head),
                    "layer": None,
                    "projection": LM_HEAD,
                    "kind": "lm_head",
                    "shape": list(head.weight.shape),
                }
            )
    return rows


def _qualname(model: nn.Module, mod: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is mod:
            return n
    raise ValueError("module not in model")


@contextmanager
def swapped_weight(model: nn.Module, name: str, new_weight: torch.Tensor):
    """Temporarily give module ``name`` the weight ``new_weight``; the original Parameter object is restored.

    Tied weights (input embeddings = lm_head) are untied for the duration and tied again after.
    """
    mod = model.get_submodule(name)
    orig = mod.weight
    mod.weight = nn.Parameter(new_weight.to(orig.dtype), requires_grad=False)  # type: ignore[arg-type]  # HF model attribute on nn.Module
    try:
        yield mod
    finally:
        mod.weight = orig


# --------------------------------------------------------------------------- the probe


class SensitivityProbe:
    """Measures KL(P_fp || P_q) and the NLL change when one module's weight is replaced.

    ``windows`` is a LongTensor [n, T]; every position but the last predicts the next token.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor) -> None:
        self.model = model.eval()
        self.windows = windows.to(model_device(model))
        self.prefix, self.blocks = transformer_blocks(model)
        with torch.inference_mode():
            calib = Calibration(self.windows, "probe", 0)
            inps, self.kwargs = capture_block_inputs(model, self.blocks[0], calib)
            # inputs[l][w]: the unquantized input of block l for window w
            self.inputs: list[list[torch.Tensor]] = [inps]
            for block in self.blocks[:-1]:
                inps = [block_output(block(x, **kw)) for x, kw in zip(inps, self.kwargs)]
                self.inputs.append(inps)
            self.ref = [self._full_logprobs(w) for w in range(len(windows))]
        self.fp_nll = self._nll(self.ref)
        self._tail = self._find_tail()
        log.info(
            "sensitivity probe: %d windows x %d tokens, block-suffix evaluation %s",
            windows.shape[0],
            windows.shape[1],
            "on" if self._tail else "off (full forwards)",
        )

    # -- forwards ------------------------------------------------------------------
    def _full_logprobs(self, w: int) -> torch.Tensor:
        out = self.model(self.windows[w : w + 1], use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        return F.log_softmax(logits[0, :-1].float(), dim=-1)

    def _find_tail(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """final norm (+ projection) + lm_head after the last block, checked against the full forward."""
        dec = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None  # type: ignore[operator]  # HF model attribute on nn.Module
        head = self.model.get_output_embeddings()  # type: ignore[operator]  # HF model attribute on nn.Module
        if dec is None or head is None:
            return None
        norm = getattr(dec, "norm", None) or getattr(dec, "final_layer_norm", None)
        proj = getattr(dec, "project_out", None)
        if norm is None:
            return None

        def tail(h: torch.Tensor) -> torch.Tensor:
            h = norm(h)
            if proj is not None:
                h = proj(h)
            return head(h)

        try:
            with torch.inference_mode():
                lp = self._suffix_logprobs(0, 0, tail)
        except Exception as e:  # architecture not understood: fall back to full forwards
            log.debug("block-suffix evaluation unavailable: %s", e)
            return None
        if not torch.allclose(lp, self.ref[0], atol=1e-4, rtol=1e-4):
            log.warning("block-suffix evaluation does not reproduce the full forward; using full forwards")
            return None
        return tail

    def _suffix_logprobs(self, layer: int, w: int, tail: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h = self.inputs[layer][w]
        for block in self.blocks[layer:]:
            h = block_output(block(h, **self.kwargs[w]))
        return F.log_softmax(tail(h)[0, :-1].float(), dim=-1)

    def _logprobs(self, w: int, layer: int | None) -> torch.Tensor:
        if layer is not None and self._tail is not None:
            return self._suffix_logprobs(layer, w, self._tail)
        return self._full_logprobs(w)

    def _nll(self, lps: list[torch.Tensor]) -> float:
        tot, n = 0.0, 0
        for w, lp in enumerate(lps):
            t = self.windows[w, 1:]
            tot += float(-lp.gather(1, t.unsqueeze(1)).double().sum())
            n += t.numel()
        return tot / n

    # -- measuring -----------------------------------------------------------------
    def evaluate(self, layer: int | None = None) -> dict[str, float]:
        """KL (mean per token, nats) and mean NLL of the model as it is now, vs the unquantized reference.

        ``layer``: the first block whose weights differ from the reference (None: anything may differ).
        """
        kl_sum, n = 0.0, 0
        lps = []
        with torch.inference_mode():
            for w in range(self.windows.shape[0]):
                lp = self._logprobs(w, layer)
                kl_sum += float(F.kl_div(lp, self.ref[w], log_target=True, reduction="sum"))
                n += lp.shape[0]
                lps.append(lp)
        nll = self._nll(lps)
        return {"kl": kl_sum / n, "nll": nll, "dnll": nll - self.fp_nll}

    def measure(self, row: dict[str, Any], new_weight: torch.Tensor) -> dict[str, float]:
        with swapped_weight(self.model, row["name"], new_weight):
            return self.evaluate(row["layer"] if row["kind"] == "linear" else None)


# --------------------------------------------------------------------------- cache + driver


@dataclass(frozen=True)
class SensitivitySpec:
    bits: int
    group_size: int = 128
    quantizer: str = "rtn"
    metric: str = "kl"  # "kl": measured; "fisher": diag-Fisher; "fisher-kl": sampled Fisher, full per token
    positions: int = 0  # fisher-kl: positions per window in the quadratic form (0: all)
    base: str = ""  # fisher-kl: expansion point "bits/group" (every module quantized there); "": fp
    seeds: int = 1  # fisher-kl: label-sampling seeds per window (replicates = windows x seeds)

    def key(self, fingerprint: str, data_sha: str) -> str:
        fields = {
            k: v
            for k, v in self.__dict__.items()
            if not ((k in ("positions", "base") and not v) or (k == "seeds" and v == 1))
        }
        blob = json.dumps({"schema": SCHEMA, "model": fingerprint, "data": data_sha, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tokens_sha(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def cache_path(key: str) -> Path:
    return cache_dir() / "sensitivity" / f"{key}.json"


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def measure_sensitivities(
    model: nn.Module,
    windows: torch.Tensor,
    bits: Iterable[int],
    group_size: int = 128,
    rows: list[dict[str, Any]] | None = None,
    metric: str = "kl",
    fingerprint: str | None = None,
    quantize_fn: Callable[[torch.Tensor, int, int], torch.Tensor] = rtn_fake_quantize,
    quantizer: str = "rtn",
    use_cache: bool = True,
) -> dict[int, dict[str, dict[str, float]]]:
    """{bits: {module name: {"kl", "nll", "dnll"}}} for each module of ``rows`` quantized alone.

    ``metric="fisher"`` replaces the measured KL by ½ Σ F_ii (w - q)² / tokens (diag empirical
    Fisher of the NLL, OBD/HAWQ-style): one forward+backward per window, then every (module, bits)
    costs only its quantization.  Values are read from / written to the on-disk cache.
    """
    return measure_choice_sensitivities(
        model, windows, [(b, group_size) for b in bits], rows, metric, fingerprint, quantize_fn, quantizer, use_cache
    )[group_size]


METRICS = ("kl", "fisher", "fisher-kl")
STORE_BYTES = 2 << 30  # fisher-kl: the (x, g) of this many bytes of replicates are scored together


def measure_choice_sensitivities(
    model: nn.Module,
    windows: torch.Tensor,
    choices: Iterable[tuple[int, int]],
    rows: list[dict[str, Any]] | None = None,
    metric: str = "kl",
    fingerprint: str | None = None,
    quantize_fn: Callable[[torch.Tensor, int, int], torch.Tensor] = rtn_fake_quantize,
    quantizer: str = "rtn",
    use_cache: bool = True,
    positions: int = 0,
    base: tuple[int, int] | None = None,
    seeds: int = 1,
) -> dict[int, dict[int, dict[str, dict[str, float]]]]:
    """{group size: {bits: {module name: {"kl", ...}}}} for each (bits, group size) choice.

    The cache holds one document per (bits, group size); ``metric="fisher-kl"`` computes every
    missing (module, choice) from one forward+backward pass per window and label seed (``seeds``
    seeds per window; see :func:`_measure_fisher_kl`), on ``positions`` evenly spaced positions per
    window (0: all), and records the mean over those replicates (``kl``) with their spread
    (``kl_std``, ``replicates``).  ``quantize_fn`` may take the module's name (``needs_name``, e.g.
    :class:`GPTQFakeQuantize`); ``quantizer`` names it in the cache key.
    """
    if seeds < 1:
        raise ConfigError(f"sensitivity: seeds must be >= 1, got {seeds}")
    if metric not in METRICS:
        raise ConfigError(f"sensitivity metric '{metric}' is not valid; valid: {', '.join(METRICS)}")
    choices = list(dict.fromkeys((int(b), int(g)) for b, g in choices))
    rows = rows if rows is not None else module_table(model)
    fingerprint = fingerprint or model_fingerprint(model, exact=False)
    dsha = tokens_sha(windows)
    docs: dict[tuple[int, int], dict[str, Any]] = {}
    paths: dict[tuple[int, int], Path] = {}
    for b, g in choices:
        fkl = metric == "fisher-kl"
        spec = SensitivitySpec(
            b,
            g,
            quantizer,
            metric,
            positions if fkl else 0,
            f"fisher at {base[0]}/{base[1]}" if fkl and base else "",
            seeds if fkl else 1,
        )
        paths[b, g] = cache_path(spec.key(fingerprint, dsha))
        doc = _load(paths[b, g]) if use_cache else {}
        docs[b, g] = (
            doc
            if doc.get("values") is not None
            else {
                "spec": spec.__dict__,
                "model": fingerprint,
                "data": dsha,
                "windows": list(windows.shape),
                "values": {},
            }
        )
    for doc in docs.values():  # a non-finite value (a broken run's) is measured again, not reused
        doc["values"] = {n: v for n, v in doc["values"].items() if math.isfinite(v.get("kl", math.nan))}
    todo = [(c, r) for c in choices for r in rows if r["name"] not in docs[c]["values"]]
    if todo:
        windows = windows.to(model_device(model))  # dsha above: from the same tokens
        t0 = time.perf_counter()
        if metric == "fisher-kl":
            _measure_fisher_kl(model, windows, todo, quantize_fn, docs, paths, positions, base, seeds=seeds)
        else:
            for g in dict.fromkeys(c[1] for c, _ in todo):
                sub = [(c[0], r) for c, r in todo if c[1] == g]
                gdocs = {b: docs[b, gg] for b, gg in docs if gg == g}
                gpaths = {b: paths[b, gg] for b, gg in paths if gg == g}
                fn = _measure_kl if metric == "kl" else _measure_fisher
                fn(model, windows, sub, g, quantize_fn, gdocs, gpaths)
        log.info("measured %d (module, choice) sensitivities in %.1f s", len(todo), time.perf_counter() - t0)
    out: dict[int, dict[int, dict[str, dict[str, float]]]] = {}
    for b, g in choices:
        out.setdefault(g, {})[b] = {r["name"]: docs[b, g]["values"][r["name"]] for r in rows}
    return out


def _measure_kl(model, windows, todo, group_size, quantize_fn, docs, paths) -> None:
    probe = SensitivityProbe(model, windows)
    last_save = time.perf_counter()
    for b, row in tqdm(todo, desc="sensitivity", leave=False, disable=None):
        w = model.get_submodule(row["name"]).weight.data
        res = probe.measure(row, _quantize(quantize_fn, row["name"], w, b, group_size))
        res["fp_nll"] = probe.fp_nll
        docs[b]["values"][row["name"]] = res
        if time.perf_counter() - last_save > 20:
            for bb in docs:
                _save(paths[bb], docs[bb])
            last_save = time.perf_counter()
    for bb in docs:
        _save(paths[bb], docs[bb])


def fisher_diagonals(model: nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Diag empirical Fisher of the NLL w.r.t. each named module's weight, per token: Σ_t (g_t ⊗ x_t)².

    For a linear y = W x the per-position gradient of W is g_t x_t^T, so its square summed over
    positions is (g²)^T (x²) — exact per-position squares without per-sample gradients.  Embedding
    rows use the squared gradient of the whole window.
    """
    fis: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}
    handles = []
    linears = {n: model.get_submodule(n) for n in names}
    for n, m in linears.items():
        fis[n] = torch.zeros_like(m.weight, dtype=torch.float32)  # type: ignore[arg-type]  # HF model attribute on nn.Module
        if isinstance(m, nn.Linear):

            def fwd(mod, args, out, n=n):
                xs[n] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                out.register_hook(lambda g, n=n: _acc(n, g))

            handles.append(m.register_forward_hook(fwd))

    def _acc(n: str, g: torch.Tensor) -> None:
        g2 = g.detach().reshape(-1, g.shape[-1]).float().pow(2)
        fis[n] += g2.t() @ xs.pop(n).pow(2)

    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    emb = [n for n, m in linears.items() if not isinstance(m, nn.Linear)]
    for n in emb:
        linears[n].weight.requires_grad_(True)
    n_tok = 0
    try:
        for w in range(windows.shape[0]):
            ids = windows[w : w + 1]
            # activations must require grad for the hooks: feed embeddings with grad enabled
            out = (
                model(
                    inputs_embeds=model.get_input_embeddings()(ids).detach().requires_grad_(True),  # type: ignore[operator]  # HF model attribute on nn.Module
                    use_cache=False,
                )
                if not emb
                else model(ids, use_cache=False)
            )
            logits = out.logits[0, :-1].float()
            loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            loss.backward()
            n_tok += ids.shape[1] - 1
            for n in emb:
                g = linears[n].weight.grad
                if g is not None:
                    fis[n] += g.float().pow(2)  # type: ignore[operator]  # HF model attribute on nn.Module
                    linears[n].weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was.get(n, False))
            p.grad = None
    return {n: f / n_tok for n, f in fis.items()}


def _measure_fisher(model, windows, todo, group_size, quantize_fn, docs, paths) -> None:
    names = sorted({r["name"] for _, r in todo})
    fis = fisher_diagonals(model, windows, names)
    for b, row in todo:
        w = model.get_submodule(row["name"]).weight.data
        err = (_quantize(quantize_fn, row["name"], w, b, group_size).float() - w.float()).pow(2)
        docs[b]["values"][row["name"]] = {"kl": 0.5 * float((fis[row["name"]] * err).sum())}
    for bb in docs:
        _save(paths[bb], docs[bb])


def _measure_fisher_kl(
    model,
    windows,
    todo,
    quantize_fn,
    docs,
    paths,
    positions: int = 0,
    base: tuple[int, int] | None = None,
    seed: int = 0,
    seeds: int = 1,
) -> None:
    """Taylor estimate of KL(p_fp || p_q) per (module, choice), full (not diagonal) within each token.

    Without ``base`` (expansion at the unquantized model): for a perturbation ΔW of one linear,
    KL ≈ ½ Σ_t Δz_tᵀ F_t Δz_t / tokens, F_t the Fisher of the output distribution at position t.
    With one label y_t sampled from the model's own distribution per position, g_t = ∂ log p(y_t) /
    ∂(module output at t) gives the unbiased estimate ½ Σ_t (g_tᵀ ΔW x_t)² / tokens ("true" Fisher,
    not the empirical one of the data labels, and not diagonal: errors that cancel in ΔW x_t count
    as cancelled).  Cross-position terms are ignored (as in per-sample Fisher estimates).

    With ``base = (bits, group)`` the Fisher and the inputs x_t are those of the model with EVERY
    measured module already quantized at ``base`` (the sharper curvature of an already-perturbed
    model is then in the estimate; ΔW is still measured from the unquantized weight, so values stay
    non-negative and additive).  A first-order expansion around that point (adding the KL gradient
    term g_tᵀ (Q_c - Q_base) x_t) was tried and dropped: the knapsack exploited its negative values
    (see docs/sensitivity.md).

    Replicates: one label draw per window and seed (``seeds`` generators seeded ``seed``,
    ``seed + 1``, ...; each draws window after window).  Each replicate's KL estimate is kept; the
    value is their mean (``kl``) with their standard deviation (``kl_std``) as the spread.

    One forward and one backward per replicate serve every (module, choice): the backward hook of
    each linear keeps its (x_t, g_t) at the evaluated positions, and every chunk of replicates (up to
    ``STORE_BYTES`` of them) is scored with each choice's ΔW computed once per chunk -- so an
    expensive quantizer (GPTQ) runs once per (module, choice), not once per replicate.  ``positions``
    > 0 evaluates the forms on that many evenly spaced positions per window only (the passes still
    see the whole window): the per-choice products, positions x in x out each, dominate the cost.
    """
    T = windows.shape[1]
    dev = windows.device
    sel = torch.linspace(0, T - 1, positions, device=dev).round().long().unique() if 0 < positions < T else None
    by_name: dict[str, list[tuple[int, int]]] = {}
    for c, r in todo:
        if r["kind"] != "linear":
            raise ConfigError(f"sensitivity metric fisher-kl supports linear modules only, not {r['name']}")
        by_name.setdefault(r["name"], []).append(c)
    mods = {n: model.get_submodule(n) for n in by_name}
    orig = {n: m.weight.data for n, m in mods.items()}
    # replicates: (label seed, window), seed-major; one generator per seed drawn window after window
    reps = [(s, w) for s in range(seed, seed + seeds) for w in range(windows.shape[0])]
    acc = {n: torch.zeros(len(reps), len(cs), dtype=torch.float64, device="cpu") for n, cs in by_name.items()}
    n_tok = torch.zeros(len(reps), dtype=torch.float64, device="cpu")
    P = T if sel is None else sel.numel()
    per_rep = P * 4 * sum(m.in_features + m.out_features for m in mods.values())  # bytes of (x, g) kept
    chunk = max(1, int(STORE_BYTES // max(per_rep, 1)))
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in mods}
    xs: dict[str, torch.Tensor] = {}

    def _grad(n: str, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).float()
        store[n].append((xs.pop(n), g if sel is None else g[sel]))

    def _fwd(mod, args, out, n):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        xs[n] = x if sel is None else x[sel]
        out.register_hook(lambda g, n=n: _grad(n, g))

    def _score(rs: list[int]) -> None:
        """Every (module, choice) on the stored replicates ``rs``: each choice's ΔW is computed once."""
        for n, cs in by_name.items():
            w = orig[n].float()
            for i, (b, gs) in enumerate(cs):
                d = _quantize(quantize_fn, n, orig[n], b, gs).float() - w
                for k, r in enumerate(rs):
                    x, g = store[n][k]
                    acc[n][r, i] = 0.5 * float(((x @ d.t()) * g).sum(-1).square().sum())
            store[n].clear()

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: _fwd(mod, a, o, n)) for n, m in mods.items()]
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gens: dict[int, torch.Generator] = {}
    try:
        if base is not None:  # the expansion point: every measured module quantized at base
            for n, m in mods.items():
                m.weight.data = _quantize(quantize_fn, n, orig[n], *base).to(orig[n].dtype)
        pending: list[int] = []
        for r, (s, w) in enumerate(tqdm(reps, desc="fisher-kl", leave=False, disable=None)):
            gen = gens.setdefault(s, torch.Generator("cpu").manual_seed(s))
            ids = windows[w : w + 1]
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # type: ignore[operator]  # HF model attribute on nn.Module
            logits = model(inputs_embeds=emb, use_cache=False).logits[0].float()
            lp = F.log_softmax(logits, -1)
            # labels drawn on the CPU generator: the same draws on every device
            y = torch.multinomial(lp.detach().exp().cpu(), 1, generator=gen).to(lp.device)
            lp.gather(1, y).sum().backward()
            n_tok[r] = ids.shape[1] if sel is None else sel.numel()
            pending.append(r)
            if len(pending) == chunk or r == len(reps) - 1:
                _score(pending)
                pending = []
    finally:
        for h in handles:
            h.remove()
        for n, m in mods.items():
            m.weight.data = orig[n]
        for n, p in model.named_parameters():
            p.requires_grad_(was.get(n, False))
            p.grad = None
    for n, cs in by_name.items():
        per = acc[n] / n_tok[:, None]  # [replicates, choices]: KL estimate of each replicate
        mean = per.mean(0)
        std = per.std(0) if len(reps) > 1 else torch.zeros_like(mean)
        for i, c in enumerate(cs):
            docs[c]["values"][n] = {"kl": float(mean[i]), "kl_std": float(std[i]), "replicates": len(reps)}
    for c in docs:
        _save(paths[c], docs[c])


# --------------------------------------------------------------------------- map + CLI


def sensitivity_map(
    model: nn.Module,
    windows: torch.Tensor,
    bits: int,
    group_size: int = 128,
    metric: str = "kl",
    fingerprint: str | None = None,
    layers: Iterable[int] | None = None,
) -> dict[str, Any]:
    """The layer x projection document of ``quantbench sensitivity`` (values: KL, nats/token).

    ``layers``: measure only these blocks (plus embeddings and lm_head); default all.
    """
    rows = module_table(model)
    if layers is not None:
        keep = set(layers)
        rows = [r for r in rows if r["layer"] is None or r["layer"] in keep]
    fingerprint = fingerprint or model_fingerprint(model, exact=False)
    vals = measure_sensitivities(model, windows, [bits], group_size, rows, metric, fingerprint)[bits]
    layer_ids = sorted({r["layer"] for r in rows if r["layer"] is not None})
    projs: list[str] = []
    for r in rows:
        if r["kind"] == "linear" and r["projection"] not in projs:
            projs.append(r["projection"])
    grid: list[list[float | None]] = [[None] * len(projs) for _ in layer_ids]
    ppl_grid: list[list[float | None]] = [[None] * len(projs) for _ in layer_ids]
    fp_nll = next((v["fp_nll"] for v in vals.values() if "fp_nll" in v), None)
    extra: dict[str, Any] = {}
    for r in rows:
        v = vals[r["name"]]
        ppl = math.exp(v["nll"]) if "nll" in v else None
        if r["kind"] == "linear":
            i, j = layer_ids.index(r["layer"]), projs.index(r["projection"])
            grid[i][j], ppl_grid[i][j] = v["kl"], ppl
        else:
            extra[r["projection"]] = {"kl": v["kl"], "ppl": ppl, "module": r["name"]}
    return {
        "schema": SCHEMA,
        "bits": bits,
        "group_size": group_size,
        "quantizer": "rtn",
        "metric": "kl_divergence (nats/token)" if metric == "kl" else "fisher-weighted weight error",
        "layers": layer_ids,
        "projections": projs,
        "values": grid,
        "embeddings": extra.get(EMBEDDINGS),
        "lm_head": extra.get(LM_HEAD),
        "ppl": {"fp": math.exp(fp_nll) if fp_nll is not None else None, "values": ppl_grid},
        "tokens": list(windows.shape),
        "model_fingerprint": fingerprint,
        "title": f"sensitivity: KL when one module is RTN {bits}-bit g{group_size}",
    }


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Means by projection and by layer, and the top modules (for reports and docs)."""
    import numpy as np

    arr = np.array(doc["values"], dtype=float)
    by_proj = dict(zip(doc["projections"], arr.mean(0).round(6).tolist()))
    by_layer = dict(zip(doc["layers"], arr.mean(1).round(6).tolist()))
    flat = [
        (arr[i, j], f"{doc['layers'][i]}.{doc['projections'][j]}")
        for i in range(arr.shape[0])
        for j in range(arr.shape[1])
    ]
    flat.sort(reverse=True)
    return {
        "mean_by_projection": by_proj,
        "mean_by_layer": by_layer,
        "top10": [(n, round(float(v), 5)) for v, n in flat[:10]],
    }
