"""Writes ``RUN/report.html`` when a training run ends, however it ends.

A callback, so the order of ``on_train_end`` says who sees what: it runs after the debugger
and profiler have flushed their files and before trackers upload the run's artifacts.
"""

from __future__ import annotations

import sys
from typing import Any

from visiontune.callbacks import Callback, TrainState


class ReportCallback(Callback):
    """At the end of a run: one self-contained HTML page from the run directory alone."""

    def on_train_end(self, state: TrainState, result: Any) -> None:
        run_dir = state.run_dir
        if not (run_dir / "config.yaml").is_file():
            return  # the start failed and its folder was removed: nothing to report on
        from visiontune.report import write_report

        try:
            write_report(run_dir)
        except Exception as e:  # the report must never cost the run
            print(
                f"warning: could not write the run report: {type(e).__name__}: {e}",
                file=sys.stderr,
            )


def from_config(cfg: Any) -> ReportCallback | None:
    """The report callback when the config asks for a report (the default)."""
    return ReportCallback() if getattr(cfg, "report", True) else None
