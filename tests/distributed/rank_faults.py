"""Faults for the torchrun tests, loaded by name in the child processes.

``KillRank1`` is a callback the tests attach with ``--callback rank_faults:KillRank1``: rank 0
(the only rank that attaches config-named callbacks) SIGKILLs its sibling rank 1 at step
``$VT_KILL_AT_STEP`` of the first attempt, as an out-of-memory killer or a lost machine would.
"""

from __future__ import annotations

import os
import signal


def KillRank1(cfg):
    import psutil

    from visiontune.callbacks import Callback

    class _Kill(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if not first_attempt or state.step != int(os.environ["VT_KILL_AT_STEP"]):
                return
            for sibling in psutil.Process().parent().children():
                if sibling.environ().get("RANK") == "1":
                    os.kill(sibling.pid, signal.SIGKILL)

    return _Kill()


def KillRank1InFirstTrial(cfg):
    """``KillRank1``, in trial 0 of a tuning study only (its run directory is ``trials/0000``):
    a study whose first distributed trial loses a rank."""
    from pathlib import Path

    return KillRank1(cfg) if Path(cfg.output).name == "0000" else None
