"""`visiontune train --profile-steps` and the profiler: section, given what does not fit: a
window where no step runs, a window with the profiler off. Through the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = ["--model", "tiny_cnn", "--weights", "none", "--trainable", "all", "--workers", "0",
        "--batch-size", "8", "--epochs", "1"]  # fmt: skip


def train(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "visiontune", "train", "--data", str(data), "--output", str(out),
         *TINY, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 training images: 2 steps of 8."""
    return write_dataset(tmp_path_factory.mktemp("profile-input") / "data", per_class=8)


def test_profile_steps_turns_the_profiler_on(data, tmp_path):
    # It was set on a profiler left off: the run trained without a trace and said nothing.
    out = train(data, tmp_path / "run", "--profile-steps", "1-2", "--set", "profiler.enabled=false")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "profile" / "trace.json").is_file()


def test_a_profiler_section_with_a_window_but_off_is_one_line(data, tmp_path):
    run = tmp_path / "run"
    out = train(data, run, "--set", "profiler.profile_steps=1-2", "--set", "profiler.enabled=false")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: invalid config value for 'profiler': profile_steps 1-2 needs the profiler, "
        "which enabled: false turns off"
    ]
    assert not run.exists()


def test_a_window_past_the_last_step_is_said(data, tmp_path):
    run = tmp_path / "run"
    out = train(data, run, "--profile-steps", "100-200")
    assert out.returncode == 0, out.stderr
    said = "profile_steps 100-200 starts after the run's last step (2): nothing is traced"
    assert f"warning: {said}" in out.stderr.splitlines()
    assert json.loads((run / "profile" / "meta.json").read_text())["profile_steps_note"] == said
    assert not (run / "profile" / "trace.json").exists()
