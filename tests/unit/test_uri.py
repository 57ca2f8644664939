"""URI parsing and opening: local paths, file://, s3:// and the errors for the rest."""

from __future__ import annotations

import pytest

from visiontune import uri as uris
from visiontune.errors import UserError


def test_schemes_and_remoteness():
    assert uris.scheme_of("/data/x") == ""
    assert uris.scheme_of("C:\\data") == ""  # a drive letter is not a scheme
    assert uris.scheme_of("S3://b/p") == "s3"
    assert not uris.is_remote("file:///data") and uris.is_remote("https://h/x.zip")
    assert uris.join("s3://b/p/", "train", "cat") == "s3://b/p/train/cat"


def test_open_local_and_file_uri_give_the_same_folder(tmp_path):
    fs, path = uris.open_fs(f"file://{tmp_path}")
    assert path == str(tmp_path) and fs.isdir(path)
    assert uris.open_fs(str(tmp_path))[1] == str(tmp_path)


def test_s3_options_carry_the_endpoint_but_no_secrets():
    assert uris.storage_options("s3://b/p", "http://127.0.0.1:9000") == {
        "endpoint_url": "http://127.0.0.1:9000"
    }
    assert uris.storage_options("/local", "http://x") == {}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/data", "unknown URI scheme 'ftp'"),
        ("s3://", "names no bucket"),
        ("https://example.org/photos/", "not an archive visiontune can open"),
    ],
)
def test_bad_uris_are_one_line_errors(uri, message):
    with pytest.raises(UserError, match=message):
        uris.open_fs(uri)


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path))
    assert uris.visiontune_home() == tmp_path
    monkeypatch.delenv("VISIONTUNE_HOME")
    assert uris.visiontune_home().parts[-2:] == (".cache", "visiontune")
