"""Shared fixtures. Helpers to import live in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (  # noqa: F401  (re-exported)
    HYMENOPTERA,
    S3Server,
    make_image,
    moto_server,
    write_dataset,
)

# Keep tests to the two cores of the CI machine, and deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# A test that imports openvino itself (pytest.importorskip) must not send OpenVINO's usage
# telemetry either (visiontune.serving.runtimes says why, where it is blocked).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


@pytest.fixture
def image_dataset(tmp_path: Path) -> Path:
    """A 2-class dataset with train/valid/test splits of 64 px JPEGs (8 images per class)."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def hymenoptera() -> Path:
    """The real ants/bees photos from ../shared, or a skip when a fresh clone lacks them."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real data not present: {HYMENOPTERA} (only in the project's CI checkout)")
    return HYMENOPTERA


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``visiontune ARGS...`` in-process; returns ``(exit_code, stdout, stderr)``."""

    def run(*args: str) -> tuple[int, str, str]:
        from visiontune.cli import main

        monkeypatch.setattr("sys.argv", ["visiontune", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep caches (features, S3 objects, downloads) out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "visiontune-home"
    monkeypatch.setenv("VISIONTUNE_HOME", str(home))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server with IAM auth on (helpers.moto_server), one per test process."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    with moto_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server's credentials in this test's environment only (and fresh s3fs clients)."""
    import boto3
    import s3fs

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # fsspec caches filesystems by their arguments, not by the environment they read; boto3's
    # default session keeps the credentials it resolved first (another test's server).
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.DEFAULT_SESSION = None
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.DEFAULT_SESSION = None
