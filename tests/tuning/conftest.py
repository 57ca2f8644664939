"""Fixtures for the tuning tests: a tiny dataset, space files, and a `visiontune` runner."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import write_dataset

ROOT = Path(__file__).resolve().parents[2]


# tiny_cnn trained from scratch on 64 px images: a trial is a couple of seconds on one core.
TINY = ["--set", "model=tiny_cnn", "--weights", "none", "--trainable", "all", "--workers", "0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes x (8 train, 4 valid, 4 test) 64 px images, shared by every tuning test."""
    root = tmp_path_factory.mktemp("tuning-data") / "data"
    return write_dataset(root, per_class={"train": 8, "valid": 4, "test": 4})


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Each test gets its own VISIONTUNE_HOME (feature cache) and working directory."""
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def vt():
    """Run the real `visiontune` CLI in a subprocess: ``vt("tune", "--data", ...)``."""
    return visiontune


@pytest.fixture
def vt_env():
    """The environment for `visiontune` subprocesses started by a test."""
    return cli_env()


@pytest.fixture
def study_of():
    """Open a study for assertions: ``study_of(name, storage)``."""
    return load


def visiontune(
    *args: str, cwd: Path | None = None, timeout: float = 120, **popen
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (one thread: the CI machine has two cores)."""
    return subprocess.run(
        [sys.executable, "-c", "from visiontune.cli import main; main()", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # This checkout's source first: an installed (or another worktree's) visiontune must not
    # answer for the code under test.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def load(study: str, storage: str):
    """The study as Optuna sees it (read-only use in assertions)."""
    from visiontune.tuning.storage import load_study

    return load_study(study, storage)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root: run the server as the package's unprivileged user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL 15 server on 127.0.0.1 (Debian's `postgresql` package)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (apt install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start postgres unprivileged")
    root = Path(tempfile.mkdtemp(prefix="vt-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(
        _as_pg_user(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "tuner", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_pg_user(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {root}",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
