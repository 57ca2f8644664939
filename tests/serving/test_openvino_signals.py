"""A process that loaded OpenVINO models still survives its signals.

OpenVINO's CPU plugin put an alternate signal stack of its own on the loading thread and, when
the models were freed in the order they were made, left the thread on a freed one: the next
handled signal (torch's DataLoader SIGCHLD handler when any child exits) killed the whole
process with SIGSEGV. That was the single-process test suite's crash at about 55 %.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import gc, os, signal, sys
from visiontune.serving.runtimes import load_runtime

first = load_runtime("openvino", sys.argv[1], device="cpu")
second = load_runtime("openvino", sys.argv[1], device="cpu")
first = None  # freed in the order they were made, not the reverse
gc.collect()
second = None
gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("still alive", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="alternate signal stacks: Linux only here")
def test_models_freed_in_any_order_leave_signal_handling_working(model_dir):
    pytest.importorskip("openvino")
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir)], capture_output=True, text=True, timeout=240
    )
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    assert p.stdout.split() == ["handled", "still", "alive"]


TELEMETRY = """
import os, sys
from visiontune.serving.runtimes import load_runtime

load_runtime("auto", sys.argv[1], device="cpu")  # picks openvino: its detection imports it
load_runtime("openvino", sys.argv[1], device="cpu")
print(sys.modules.get("openvino_telemetry", "absent"))
"""


def test_loading_openvino_sends_no_telemetry_and_writes_nothing_home(model_dir, tmp_path):
    # `import openvino` alone sent a Google Analytics event from a forked process and kept a
    # usage count in ~/intel; the runtime loads OpenVINO with its telemetry package blocked.
    pytest.importorskip("openvino")
    home = tmp_path / "home"
    home.mkdir()
    p = subprocess.run(
        [sys.executable, "-c", TELEMETRY, str(model_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HOME": str(home), "CI": "false"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["None"]  # blocked: ovc fell back to its no-op stub
    assert not (home / "intel").exists()
