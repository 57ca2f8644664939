"""Fixtures for the tuning tests: a tiny dataset, space files, and a `visiontune` runner."""

from __future__ import annotations

import os
import subprocess
import sys
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
    env["PYTHONPATH"] = str(ROOT)
    return env


def load(study: str, storage: str):
    """The study as Optuna sees it (read-only use in assertions)."""
    from visiontune.tuning.study import load_study

    return load_study(study, storage)
