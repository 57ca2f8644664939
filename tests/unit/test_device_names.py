"""``--device`` names a user can mistype: one line naming the choices, not a torch traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visiontune.device import resolve_device
from visiontune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_with_an_unknown_device_is_one_line(tmp_path):
    # The device is resolved before the model is read: no model needed to see the message.
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "evaluate", str(tmp_path), "--data", str(tmp_path),
         "--device", "gpu"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip

    # Before: RuntimeError "Expected one of cpu, cuda, ipu, ..." with a traceback.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: unknown device 'gpu'; use auto, cpu or cuda (cuda:N for GPU N)"
    )


@pytest.mark.parametrize("name", ["mps", "cuda:x", "cuda:", "CPU", "cuda:0:1"])
def test_other_unknown_names_are_refused(name):
    with pytest.raises(UserError, match="unknown device"):
        resolve_device(name)


def test_a_gpu_this_machine_lacks_is_refused():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or cuda:0 on a CPU
    with pytest.raises(UserError, match=f"--device {missing} was asked for but"):
        resolve_device(missing)


def test_the_names_that_exist_still_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
