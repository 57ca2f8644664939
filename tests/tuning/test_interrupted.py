"""Ctrl-C in the middle of a trial, then the same command again: the study runs the trial
that was stopped (with its parameters), instead of counting its point as tried."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import TINY


def test_a_trial_stopped_by_ctrl_c_runs_again_when_the_study_is_continued(
    tiny_data, tmp_path, vt, study_of, monkeypatch
):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.001, max: 0.1, scaling: log}\n")
    marker = tmp_path / "interrupted"
    monkeypatch.setenv("VT_INTERRUPT_MARKER", str(marker))  # the `vt` runs inherit both
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p),
    )
    args = [
        "tune", "--data", str(tiny_data), "--space", str(space), "--study", "s",
        "--max-trials", "2", "--epochs", "1", "--set", "max_steps_per_epoch=2", *TINY,
        "--set", "callbacks=[interrupt_callback:CtrlCOnce]", "--heartbeat", "1",
    ]  # fmt: skip
    stopped = vt(*args, cwd=tmp_path)
    # The first trial, the untuned default, sent itself SIGINT after its first step.
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "stopped; completed trials are kept, re-run the same command to continue"
    )
    assert Path(marker.read_text()).name == "0000"

    again = vt(*args, "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["trials"] == {"COMPLETE": 2, "FAIL": 1}
    from visiontune.tuning.trials import best_summary, trial_rows

    study = study_of("s", str(tmp_path / "studies" / "s" / "journal.log"))
    rows = trial_rows(study)  # what tune status --json shows
    [failed] = [r for r in rows if r["state"] == "FAIL"]
    [retry] = [r for r in rows if r["retry_of"] is not None]
    assert failed["number"] == 0 and failed["fail_reason"] == "interrupted; queued again"
    # The stopped trial ran again, as the untuned default it was, with the same params.
    assert retry["retry_of"] == 0 and retry["state"] == "COMPLETE"
    assert retry["baseline"] and retry["params"] == failed["params"]
    # ...so the study weighs its trials against the default (without the retry it had
    # no default, and took its top trial unweighed): what tune best says.
    assert "untuned default" in best_summary(study)["selection"]
