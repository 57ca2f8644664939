"""A callback a training subprocess loads by name (``pause_callback:PauseAtStep``): at step
``$VT_PAUSE_STEP`` it writes ``$VT_PAUSE_MARKER`` and blocks, so a test can SIGKILL the run
at a known point instead of racing it."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def PauseAtStep(cfg):
    from visiontune.callbacks import Callback

    class _Pause(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            if state.step == int(os.environ["VT_PAUSE_STEP"]):
                Path(os.environ["VT_PAUSE_MARKER"]).write_text(str(state.step))
                threading.Event().wait(600)  # until the test kills this process

    return _Pause()
