"""Ctrl-C in the middle of a trial, then the same command again: the study runs the trial
that was stopped (with its parameters), instead of counting its point as tried; a stopped
worker says so in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space
from visiontune.tuning.study import TuneSettings, create_study
from visiontune.tuning.trials import best_summary, trial_rows
from visiontune.tuning.workers import wait_workers


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


def test_a_worker_stopped_in_a_trial_says_so_in_one_line(tiny_data, tmp_path, vt, monkeypatch):
    monkeypatch.setenv("VT_INTERRUPT_MARKER", str(tmp_path / "interrupted"))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p),
    )
    fixed = build_config(
        TrainConfig,
        None,
        {"data": str(tiny_data), "model": "tiny_cnn", "weights": "none", "trainable": "all",
         "workers": 0, "epochs": 1, "max_steps_per_epoch": 2,
         "callbacks": ["interrupt_callback:CtrlCOnce"]},
    )  # fmt: skip
    space = parse_space({"lr": {"type": "continuous", "min": 0.001, "max": 0.1, "scaling": "log"}})
    settings = TuneSettings(study="w", study_dir=str(tmp_path / "w"), heartbeat=1, cv=0)
    study, url, _ = create_study(settings, fixed, space)  # a study with no trial yet

    out = vt("tune", "worker", "--study", "w", "--storage", url, "--study-dir", str(tmp_path / "w"))
    assert out.returncode == 128 + signal.SIGINT and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "worker stopped; its trial is queued again for the next run"
    )
    states = [r["state"] for r in trial_rows(study)]
    assert states == ["FAIL", "WAITING"]


def test_workers_all_stopped_by_a_signal_stop_the_study_like_ctrl_c():
    # SIG_DFL first: a process started from a background job inherits SIGINT ignored (the
    # shell's rule for asynchronous commands), and then this kill did nothing and it exited 0.
    stop = (
        "import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.kill(os.getpid(), signal.SIGINT)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", stop]) for _ in range(2)]
    # Not "all 2 workers failed": they were stopped, and their trials were queued again.
    with pytest.raises(KeyboardInterrupt):
        wait_workers(procs)


def test_ctrl_c_in_tune_best_train_best_is_one_line(tiny_data, tmp_path, vt, monkeypatch):
    marker = tmp_path / "interrupted"
    marker.write_text("not yet")  # the study's trial runs to the end
    monkeypatch.setenv("VT_INTERRUPT_MARKER", str(marker))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p),
    )
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.001, max: 0.1, scaling: log}\n")
    study = vt(
        "tune", "--data", str(tiny_data), "--space", str(space), "--study", "b",
        "--max-trials", "1", "--epochs", "1", "--set", "max_steps_per_epoch=2", *TINY,
        "--set", "callbacks=[interrupt_callback:CtrlCOnce]", cwd=tmp_path,
    )  # fmt: skip
    assert study.returncode == 0, study.stderr
    marker.unlink()  # the final training sends itself SIGINT after its first step
    out = vt("tune", "best", "b", "--train-best", cwd=tmp_path)
    assert out.returncode == 128 + signal.SIGINT and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "stopped; the final model is not trained: run the same command again to train it"
    )
