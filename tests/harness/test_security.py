"""Issue U (security): nothing planted in a run directory or a download cache runs code, Chromium keeps its
sandbox unless it cannot have one, `gpu-check --out` never overwrites a run's records, and files are
fetched and verified without running any build code."""

import argparse
import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import threading

import pytest
import torch

from quantbench.harness.inputs import data
from quantbench.harness.report import browser
from quantbench.harness.tools import gpu_check
from quantbench.methods import bitnet as B

from ..methods.test_bitnet import _qat


class _Planted:
    """A pickle that, when loaded, writes ``marker`` (what an attacker's file in a run directory would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- QAT checkpoints


def test_planted_pickle_checkpoint_is_never_unpickled(tmp_path, caplog, _one_thread):
    marker = tmp_path / "PWNED"
    ref_meth, _, _ = _qat(tmp_path / "ref", steps=6, checkpoint_every=3)
    run = tmp_path / "run"
    run.mkdir()
    # under the old checkpoint name (what the old code loaded with torch.load(weights_only=False)) ...
    torch.save({"step": 3, "config": ref_meth.config.to_dict(), "payload": _Planted(marker)}, run / "qat_step3.pt")
    # ... and as the new format: a real JSON of this config beside a pickle posing as the tensors
    shutil.copy(tmp_path / "ref" / "qat_step6.json", run / "qat_step6.json")
    (run / "qat_step6.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    with caplog.at_level(logging.WARNING, logger=B.log.name):
        meth, _, _ = _qat(run, steps=6, checkpoint_every=3)
    assert not marker.exists()
    assert "pickle checkpoints are never loaded" in caplog.text and "unreadable" in caplog.text
    # nothing was resumed from either: the run is the uninterrupted one
    assert meth.artifacts["loss_curve"] == ref_meth.artifacts["loss_curve"]
    # the planted file is live: the old loader would have run it
    torch.load(run / "qat_step3.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_qat_checkpoint_is_safetensors_and_json(tmp_path, _one_thread):
    _qat(tmp_path, steps=4, checkpoint_every=2)
    meta = json.loads((tmp_path / "qat_step4.json").read_text())
    assert meta["step"] == 4 and len(meta["loss_curve"]) == 4 and meta["format"] == B.CHECKPOINT_FORMAT
    assert isinstance(meta["rng"]["torch"], list) and meta["config"]["steps"] == 4
    assert (tmp_path / "qat_step4.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    tensors = B.load_file(str(tmp_path / "qat_step4.safetensors"))
    assert any(k.startswith("linear.") for k in tensors) and any(k.endswith(".exp_avg") for k in tensors)


def test_checkpoint_of_another_config_is_ignored(tmp_path, caplog, _one_thread):
    _qat(tmp_path, steps=4, checkpoint_every=2, lr=1e-3)
    assert (tmp_path / "qat_step4.json").exists()
    with caplog.at_level(logging.WARNING, logger=B.log.name):
        meth, _, _ = _qat(tmp_path, steps=4, checkpoint_every=2, lr=2e-3)
    assert "different config" in caplog.text
    assert [s for s, _ in meth.artifacts["loss_curve"]] == [1, 2, 3, 4]  # started over
    ref, _, _ = _qat(None, steps=4, checkpoint_every=2, lr=2e-3)
    assert meth.artifacts["loss_curve"] == ref.artifacts["loss_curve"]


def test_checkpoint_links_out_of_the_run_dir_are_ignored(tmp_path, caplog, _one_thread):
    elsewhere = tmp_path / "elsewhere"
    ref, _, _ = _qat(elsewhere, steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    run.mkdir()
    for suffix in (".json", ".safetensors"):
        (run / f"qat_step2{suffix}").symlink_to(elsewhere / f"qat_step4{suffix}")
    assert B.qat_checkpoints(run) == []
    meth, _, _ = _qat(run, steps=4, checkpoint_every=2)
    assert [s for s, _ in meth.artifacts["loss_curve"]] == [1, 2, 3, 4]
    assert (elsewhere / "qat_step4.json").exists()  # a link's target is never deleted


# --------------------------------------------------------------------------- pinned downloads


def _sdist(path, marker):
    """A source distribution whose setup.py writes ``marker`` when anything builds it (pip download does)."""
    setup = (f"open({str(marker)!r}, 'w').write('built')\n"
             "from setuptools import setup\nsetup(name='evil', version='1.0')\n")
    with tarfile.open(path, "w:gz") as t:
        for name, text in (("evil-1.0/setup.py", setup), ("evil-1.0/PKG-INFO", "Name: evil\nVersion: 1.0\n")):
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PEP 503 file:// index with evil-1.0.tar.gz, the only source pip is configured with; the cache in tmp."""
    marker = tmp_path / "BUILT"
    files = tmp_path / "files"
    files.mkdir()
    sha = _sdist(files / "evil-1.0.tar.gz", marker)
    page = tmp_path / "simple" / "evil"
    page.mkdir(parents=True)

    def publish(link_hash=None):
        frag = f"#sha256={link_hash}" if link_hash else ""
        (page / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="../../files/evil-1.0.tar.gz{frag}">evil-1.0.tar.gz</a></body></html>')

    publish(sha)
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.setenv(var, "")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    art = data.PypiArtifact("evil==1.0", "evil-1.0.tar.gz", sha)
    return art, files / "evil-1.0.tar.gz", marker, publish, tmp_path / "cache" / "downloads"


def _no_pip_download(monkeypatch):
    calls = []
    real = data.subprocess.run

    def run(cmd, *a, **kw):
        calls.append(cmd)
        assert "download" not in cmd and "install" not in cmd, cmd
        return real(cmd, *a, **kw)

    monkeypatch.setattr(data.subprocess, "run", run)
    return calls


def test_fetch_downloads_the_exact_file_without_building_it(index, monkeypatch):
    art, served, marker, _, downloads = index
    _no_pip_download(monkeypatch)
    path = data.fetch_artifact(art)
    assert path == downloads / "evil-1.0.tar.gz" and path.read_bytes() == served.read_bytes()
    assert not marker.exists()  # the sdist's setup.py never ran
    assert [p.name for p in downloads.iterdir()] == ["evil-1.0.tar.gz"]
    assert data.fetch_artifact(art) == path  # cached: verified again, not fetched


def test_tampered_download_is_refused_deleted_and_never_unpacked(index, monkeypatch):
    art, served, marker, publish, downloads = index
    _no_pip_download(monkeypatch)
    publish(None)  # the index states no hash ...
    _sdist(served, marker)  # ... and serves another file under the pinned name
    served.write_bytes(served.read_bytes() + b"\0")
    with pytest.raises(data.ArtifactError, match=r"sha256 [0-9a-f]{64} != pinned .*deleted, nothing was unpacked"):
        data.fetch_artifact(art)
    assert list(downloads.iterdir()) == []  # neither the file nor a partial download is left
    assert not marker.exists()


def test_index_stating_another_sha256_is_not_downloaded(index, monkeypatch, caplog):
    art, _, marker, publish, downloads = index
    publish("f" * 64)
    with caplog.at_level(logging.WARNING, logger=data.log.name), pytest.raises(data.ArtifactError,
                                                                                match="lists evil-1.0.tar.gz"):
        data.fetch_artifact(art)
    assert "not the pinned" in caplog.text
    assert list(downloads.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil-1.0.tar.gz", "/tmp/evil-1.0.tar.gz", "sub/evil.tar.gz", ".hidden", ".."])
def test_artifact_file_name_stays_in_the_cache(index, name):
    art = data.PypiArtifact("evil==1.0", name, "0" * 64)
    with pytest.raises(data.ArtifactError, match="not a plain file name"):
        data.fetch_artifact(art)


def test_fetch_over_http_json_simple_api(index, monkeypatch):
    """PEP 691 JSON from an HTTP index (a local server), the file fetched from the URL it gives."""
    art, served, marker, _, downloads = index
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Accept")))
            if self.path == "/simple/evil/":
                body = json.dumps({"meta": {"api-version": "1.0"}, "name": "evil", "files": [
                    {"filename": "evil-1.0.tar.gz", "url": "/pkg/evil-1.0.tar.gz", "hashes": {"sha256": art.sha256}},
                    {"filename": "evil-0.9.tar.gz", "url": "/pkg/evil-0.9.tar.gz", "hashes": {}}]}).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            elif self.path == "/pkg/evil-1.0.tar.gz":
                body, ctype = served.read_bytes(), "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
        path = data.fetch_artifact(art)
    finally:
        server.shutdown()
        server.server_close()
    assert path.read_bytes() == served.read_bytes() and not marker.exists()
    assert seen[0][0] == "/simple/evil/" and "application/vnd.pypi.simple.v1+json" in seen[0][1]
    assert seen[1][0] == "/pkg/evil-1.0.tar.gz" and len(seen) == 2


# --------------------------------------------------------------------------- headless Chromium


def test_chromium_keeps_its_sandbox_unless_root(monkeypatch, caplog):
    assert "--no-sandbox" not in browser.FLAGS
    assert browser.running_as_root() == (os.geteuid() == 0)
    monkeypatch.setattr(browser, "running_as_root", lambda: False)
    with caplog.at_level(logging.WARNING, logger=browser.log.name):
        assert "--no-sandbox" not in browser.chromium_flags()
    assert not caplog.records
    monkeypatch.setattr(browser, "running_as_root", lambda: True)  # Chromium will not start sandboxed as root
    with caplog.at_level(logging.WARNING, logger=browser.log.name):
        assert "--no-sandbox" in browser.chromium_flags()
    assert "--no-sandbox" in caplog.text and "root" in caplog.text


def test_browser_starts_chromium_sandboxed(monkeypatch, tmp_path):
    argvs = []

    def spawn(exe, argv, env, **kw):
        argvs.append(argv)
        raise OSError("not started in this test")

    monkeypatch.setattr(browser, "running_as_root", lambda: False)
    monkeypatch.setattr(browser.os, "posix_spawn", spawn)
    monkeypatch.setattr(browser.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match="not started"):
        browser.Browser(executable="/nonexistent/chromium")
    assert "--headless" in argvs[0] and "--no-sandbox" not in argvs[0]
    assert list(tmp_path.iterdir()) == []  # the profile of a browser that did not start is removed


# --------------------------------------------------------------------------- gpu-check --out


def _gpu_check_args(out, **kw):
    return argparse.Namespace(**{"dry_run": True, "out": str(out), "suites": None, "only": "int8", "seed": 0, **kw})


@pytest.fixture
def _no_checks(monkeypatch):
    def run_checks(*a, **kw):
        raise AssertionError("gpu-check ran although --out was refused")

    monkeypatch.setattr(gpu_check, "run_checks", run_checks)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_gpu_check_refuses_an_out_dir_holding_records(tmp_path, capsys, _no_checks):
    (tmp_path / "records.jsonl").write_text('{"earlier": "run"}\n')
    assert gpu_check.cmd_gpu_check(_gpu_check_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records.jsonl already exists" in err
    assert (tmp_path / "records.jsonl").read_text() == '{"earlier": "run"}\n'


def test_gpu_check_never_writes_through_a_records_link(tmp_path, capsys, _no_checks):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "records.jsonl").symlink_to(tmp_path / "victim")
    assert gpu_check.cmd_gpu_check(_gpu_check_args(tmp_path / "out")) == 2
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize("suites", ["../../etc", "smoke,/tmp/x", "..", ".hidden"])
def test_gpu_check_suite_names_stay_under_out(tmp_path, capsys, _no_checks, suites):
    assert gpu_check.cmd_gpu_check(_gpu_check_args(tmp_path / "out", dry_run=False, suites=suites)) == 2
    assert "invalid suite name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
