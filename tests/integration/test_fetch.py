"""HTTP downloads against a real HTTP server on loopback: cached once, verified, atomic."""

from __future__ import annotations

import functools
import hashlib
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import write_dataset

from visiontune.data.folder import discover
from visiontune.errors import UserError
from visiontune.uri import download

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; ``server.requests`` lists the paths asked for."""
    www = tmp_path / "www"
    www.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=www))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.www, httpd.requests = www, requests
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def tiny_zip(tmp_path: Path, www: Path) -> Path:
    src = write_dataset(tmp_path / "src" / "tiny", per_class=2, splits=("train", "val"), size=8)
    archive = www / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(src.rglob("*.jpg")):
            z.write(f, f.relative_to(src.parent).as_posix())
    return archive


def test_http_archive_is_downloaded_once_and_opened_as_a_dataset(tmp_path, home, server):
    tiny_zip(tmp_path, server.www)
    index = discover(f"{server.url}/tiny.zip")
    assert index.class_ids == ["cat", "dog"]
    assert index.counts() == {"train": [2, 2], "valid": [2, 2]}
    assert Path(index.root).is_relative_to(home / "datasets")
    asked = len(server.requests)
    assert discover(f"{server.url}/tiny.zip").splits == index.splits
    assert len(server.requests) == asked  # the second open used the cache


def test_tar_gz_archive(tmp_path, home, server):
    src = write_dataset(tmp_path / "src" / "tgz", per_class=1, splits=("train",), size=8)
    with tarfile.open(server.www / "d.tar.gz", "w:gz") as t:
        t.add(src, arcname="tgz")
    assert discover(f"{server.url}/d.tar.gz").counts() == {"train": [1, 1]}


def test_checksum_mismatch_leaves_no_complete_looking_file(tmp_path, server):
    archive = tiny_zip(tmp_path, server.www)
    dest = tmp_path / "dl" / "tiny.zip"
    with pytest.raises(UserError, match=r"checksum mismatch for .*tiny\.zip"):
        download(f"{server.url}/tiny.zip", dest, sha256="0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []  # no file, no .partial, no metadata
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert download(f"{server.url}/tiny.zip", dest, sha256=good, progress=False) == dest
    assert dest.read_bytes() == archive.read_bytes()


def test_size_is_recorded_and_checked_when_no_checksum_is_known(tmp_path, server):
    tiny_zip(tmp_path, server.www)
    dest = tmp_path / "dl" / "tiny.zip"
    download(f"{server.url}/tiny.zip", dest, progress=False)
    dest.write_bytes(dest.read_bytes()[:-10])  # damaged after the fact
    with pytest.raises(UserError, match=r"bytes but .* has"):
        download(f"{server.url}/tiny.zip", dest, progress=False)


def test_unreachable_url_names_the_url_and_where_to_put_the_file(tmp_path, free_tcp_port):
    url = f"http://127.0.0.1:{free_tcp_port}/data/tiny.zip"
    dest = tmp_path / "dl" / "tiny.zip"
    with pytest.raises(UserError) as e:
        download(url, dest, progress=False)
    message = str(e.value)
    assert "\n" not in message
    # An offline machine is told it cannot reach the server, not that the file is missing.
    assert message.startswith(f"cannot download {url} (cannot reach the server: ")
    assert "404" not in message
    assert message.endswith(f"download it by hand and put it at {dest}")
    assert not dest.exists()


def test_missing_file_on_server_is_one_clear_line(tmp_path, server):
    with pytest.raises(
        UserError, match=r"cannot download .*/nope\.zip \(HTTP 404 (File )?not found\)"
    ):
        download(f"{server.url}/nope.zip", tmp_path / "nope.zip", progress=False)


def test_file_put_by_hand_is_used_without_network(tmp_path, free_tcp_port):
    payload = b"archive bytes"
    dest = tmp_path / "by-hand.zip"
    dest.write_bytes(payload)
    url = f"http://127.0.0.1:{free_tcp_port}/by-hand.zip"  # nothing listens there
    sha = hashlib.sha256(payload).hexdigest()
    assert download(url, dest, sha256=sha, progress=False) == dest
