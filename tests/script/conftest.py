"""Fixtures for script-mode tests: the example scripts, a channel folder and the real CLI (the
loopback S3 server, ``s3_env``, comes from tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture
def scripts() -> Path:
    return SCRIPTS


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    """A small 'training' channel: two class folders with a few files each."""
    root = tmp_path / "data"
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.txt").write_text(f"{cls} {i}")
    return root


@pytest.fixture
def vt():
    """Run the real ``visiontune`` console entry point; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "visiontune", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **kwargs.pop("env", {})},
            **kwargs,
        )

    return run
