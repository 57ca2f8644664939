"""A callback a tuning subprocess loads by name (``interrupt_callback:CtrlCOnce``): the first
training run to finish a step sends SIGINT to its own process, as Ctrl-C in the terminal would,
and writes ``$VT_INTERRUPT_MARKER`` so that no later run (the continued study) is stopped.
Stopping itself, not a signal from the test, puts the interrupt inside a trial without racing
it."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def CtrlCOnce(cfg):
    from visiontune.callbacks import Callback

    class _CtrlC(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            marker = Path(os.environ["VT_INTERRUPT_MARKER"])
            if not marker.exists():
                marker.write_text(str(cfg.output))
                os.kill(os.getpid(), signal.SIGINT)

    return _CtrlC()
