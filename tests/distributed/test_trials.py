"""Distributed tuning trials (``visiontune tune --trial-nproc 2``): each trial is a 2-process
torchrun job on CPU (gloo, loopback) that the worker follows through the trial's run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset

from visiontune.config import TrainConfig, build_config
from visiontune.train import train

HERE = Path(__file__).resolve().parent
TIMEOUT = 420  # a hang guard only: a healthy study takes seconds

FIXED = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "head",
    "batch_size": 8,
    "epochs": 2,
    "workers": 0,
    "precision": "fp32",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 24 training images: 3 global batches of 8 an epoch, 4 images per rank and step.
    root = tmp_path_factory.mktemp("trials") / "data"
    return write_dataset(
        root, classes=("a", "b", "c"), per_class={"train": 8, "valid": 4, "test": 4}
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # rank_faults (the fault callback) and helpers importable in the trials' ranks
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _valid_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["loss"] for r in rows if r["split"] == "valid"}


@pytest.fixture(scope="module")
def study(dataset, tmp_path_factory):
    """A 2-trial study of 2-process trials whose first trial loses rank 1 (SIGKILL) at step 1.

    Returns the finished tune command, the study and its directory.
    """
    from visiontune.tuning.storage import load_study

    where = tmp_path_factory.mktemp("study")
    space = where / "space.yaml"
    space.write_text("lr: {type: categorical, values: [0.05, 0.02, 0.01]}\n")
    sets = [f"--set={k}={v}" for k, v in FIXED.items()]
    env = {**_env(), "VT_KILL_AT_STEP": "1"}
    cmd = [sys.executable, "-m", "visiontune", "tune", "--data", str(dataset), "--space",
           str(space), "--study", "s", "--max-trials", "2", "--strategy", "grid",
           "--trial-nproc", "2", *sets, "--set=callbacks=[rank_faults:KillRank1InFirstTrial]",
           "--heartbeat", "1", "--objective", "valid_loss"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    study_dir = where / "studies" / "s"
    return proc, load_study("s", str(study_dir / "journal.log")), study_dir


def test_a_study_of_distributed_trials_finishes_and_each_value_is_its_run(study, dataset, tmp_path):
    proc, s, _ = study
    assert proc.returncode == 0, proc.stderr
    done = [t for t in s.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert "on 2 processes (cpu, torchrun)" in proc.stderr
    for t in done:
        run = Path(t.user_attrs["run_dir"])
        losses = _valid_losses(run)
        assert sorted(losses) == [1, 2]  # every epoch logged once: one writer
        # The objective is the best epoch's valid_loss as the trial's own run logged it.
        assert t.value == min(losses.values())
        assert t.user_attrs["best_epoch"] == min(losses, key=losses.get)
        assert t.user_attrs["epochs_run"] == 2
        assert (run / "model" / "model.json").is_file()
    # Rank 0 alone wrote the run dirs: the very files a one-process run of the same config
    # writes (checkpoints aside: finished trials drop them; one epoch writes the same files).
    run = Path(done[0].user_attrs["run_dir"])
    cfg = build_config(TrainConfig, run / "config.yaml",
                       {"output": str(tmp_path / "one"), "resolved": None, "epochs": 1})  # fmt: skip
    want = {f for f in _files(train(cfg).run_dir) if not f.startswith("checkpoints/")}
    for t in done:
        assert _files(Path(t.user_attrs["run_dir"])) == want


def test_a_trial_whose_rank_dies_fails_in_one_line_and_the_study_goes_on(study):
    proc, s, study_dir = study
    failed = [t for t in s.get_trials() if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [0]
    reason = failed[0].user_attrs["fail_reason"]
    assert reason == "rank 1 was killed by SIGKILL"
    assert "trial 0: fail" in proc.stderr and reason in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (study_dir / "trials" / "0000" / "model").exists()
    assert [t.number for t in s.get_trials() if t.state.name == "COMPLETE"] == [1, 2]


class _PrunesAtEpoch:
    """An Optuna trial stand-in whose pruner says stop once epoch ``at`` is reported."""

    def __init__(self, at: int) -> None:
        self.at, self.reported, self.user_attrs = at, [], {}

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return self.reported[-1][0] >= self.at

    def set_user_attr(self, key, value) -> None:
        self.user_attrs[key] = value


def test_a_pruned_distributed_trial_stops_after_the_pruned_epoch(dataset, tmp_path, monkeypatch):
    from visiontune.tuning.distributed import train_on_torchrun
    from visiontune.tuning.objective import _Reporter

    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    run = tmp_path / "trial"
    cfg = build_config(TrainConfig, None, {**FIXED, "epochs": 4, "data": str(dataset),
                                           "output": str(run), "lr": 0.05, "progress": False,
                                           "report": False})  # fmt: skip
    trial = _PrunesAtEpoch(2)
    reporter = _Reporter(trial, "valid_loss", prune=True)
    result = train_on_torchrun(cfg, trial, reporter, 2, prune=True)
    losses = _valid_losses(run)
    assert sorted(losses) == [1, 2]  # stopped after epoch 2 of 4, not later
    assert trial.reported == [(1, losses[1]), (2, losses[2])]  # each epoch as it was logged
    assert reporter.pruned_at == 2 and result.stop_reason == "pruned"
    assert result.model_dir is not None and (result.model_dir / "model.json").is_file()
    assert [m["epoch"] for m in result.history] == [1, 2]


def test_more_trial_processes_than_cores_or_a_batch_that_does_not_split_is_one_line(
    dataset, tmp_path, cli, monkeypatch
):
    from visiontune.device import available_cores

    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, values: [0.05, 0.01]}\n")
    base = ["tune", "--data", dataset, "--space", space, "--model", "tiny_cnn", "--weights",
            "none", "--device", "cpu"]  # fmt: skip
    too_many = available_cores() + 1  # one worker is enough to ask for too many
    code, _, err = cli(*base, "--batch-size", "8", "--trial-nproc", too_many, "--parallel", "1")
    assert code == 2
    assert err.strip().startswith(f"error: --parallel 1 x --trial-nproc {too_many} = ")
    assert f"this machine has {available_cores()} CPU core(s)" in err and "\n" not in err.strip()
    code, _, err = cli(*base, "--batch-size", "7", "--trial-nproc", "2", "--parallel", "1")
    if available_cores() >= 2:
        assert code == 2
        assert err.strip() == (
            "error: --batch-size 7 is the global batch and does not split evenly over 2 "
            "processes; give a multiple of 2"
        )
    assert not (tmp_path / "studies").exists()  # refused before the study was created
