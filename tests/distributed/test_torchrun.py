"""Data-parallel training through the real CLI on torchrun: 2 CPU processes over gloo on
loopback, against the same job in one process.

The trainable part has no batch statistics (a frozen tiny_cnn backbone keeps its batch-norm
in eval mode; with the feature cache only the linear head trains), so a 2-process run with
global batch B must follow the 1-process run with batch B up to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_dataset

from visiontune.config import TrainConfig, build_config
from visiontune.train import train

HERE = Path(__file__).resolve().parent
TIMEOUT = 420  # a hang guard only: a healthy run takes seconds

COMMON = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "head",
    "batch_size": 8,
    "lr": 0.05,
    "epochs": 3,
    "workers": 0,
    "precision": "fp32",
    "progress": False,
    "report": False,
    "checkpoint_every_steps": 2,
    # augment light trains over images here (small data would cache augmented views instead)
    "augment_views": 0,
}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    # 24 training images: 3 global batches of 8 an epoch, 4 images per rank and step.
    return write_dataset(
        tmp_path / "data", classes=("a", "b", "c"), per_class={"train": 8, "valid": 4, "test": 4}
    )


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    return out


def torchrun_cmd(data: Path, out: Path, *extra: str, pythonpath=(), **values):
    """The command line and environment of ``visiontune train --nproc-per-node 2``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*map(str, pythonpath), str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]
    )
    env.pop("OMP_NUM_THREADS", None)  # let the launcher share the cores out
    cmd = [sys.executable, "-m", "visiontune", "train", "--data", str(data), "--output", str(out),
           "--nproc-per-node", "2", *_flags({**COMMON, **values}), *extra]  # fmt: skip
    return cmd, env


def torchrun_train(data: Path, out: Path, *extra: str, pythonpath=(), **values):
    """``visiontune train --nproc-per-node 2`` in a subprocess; returns the CompletedProcess."""
    cmd, env = torchrun_cmd(data, out, *extra, pythonpath=pythonpath, **values)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def one_process(data: Path, out: Path, **values):
    return train(build_config(TrainConfig, None, {**COMMON, **values, "data": str(data),
                                                  "output": str(out)}))  # fmt: skip


def epochs(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("epoch", "split", "loss", "accuracy")} for r in rows]


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("augment", ["light", "none"], ids=["images", "feature-cache"])
def test_two_processes_match_one_and_only_rank_0_writes(dataset, tmp_path, monkeypatch, augment):
    ref = one_process(dataset, tmp_path / "one", augment=augment)
    events = tmp_path / "events.txt"
    monkeypatch.setenv("VT_TEST_EVENTS", str(events))
    p = torchrun_train(dataset, tmp_path / "two", "--callback", "helpers:EventLog",
                       augment=augment)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "batch size 8 (4 per process" in p.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert ref.used_feature_cache == (augment == "none")

    got, want = epochs(two), epochs(one)
    assert [(r["epoch"], r["split"]) for r in got] == [(r["epoch"], r["split"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-4)
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-4)
    two_eval = json.loads((two / "evaluation.json").read_text())
    one_eval = json.loads((one / "evaluation.json").read_text())
    assert two_eval["confusion_matrix"] == one_eval["confusion_matrix"]
    assert two_eval["accuracy"] == one_eval["accuracy"]
    assert two_eval["loss"] == pytest.approx(one_eval["loss"], abs=1e-4)

    # One writer: the same files as the one-process run (plus the torchrun job's id), every
    # metric line once, and a config-named callback attached once.
    assert files(two) == files(one) | {"checkpoints/job.json"}
    assert events.read_text().split() == ["train_start", "epoch_end", "epoch_end", "epoch_end",
                                          "train_end"]  # fmt: skip


def test_sharded_evaluation_equals_one_process_exactly(dataset, tmp_path):
    from visiontune.evaluate import evaluate

    p = torchrun_train(dataset, tmp_path / "two", augment="light", epochs=1)
    assert p.returncode == 0, p.stderr
    single = evaluate(tmp_path / "two" / "model", str(dataset), "test", precision="fp32",
                      device="cpu", workers=0, progress=False)  # fmt: skip
    sharded = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    for key in ("loss", "accuracy", "top5", "confusion_matrix", "per_class"):
        assert sharded[key] == single[key], key  # the same model: the very same numbers


def test_sigkill_of_a_rank_restarts_the_group_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    ref = one_process(dataset, tmp_path / "one", augment="light")
    monkeypatch.setenv("VT_KILL_AT_STEP", "5")  # epoch 2, after the step-4 checkpoint
    p = torchrun_train(dataset, tmp_path / "two", "--max-restarts", "1",
                       "--callback", "rank_faults:KillRank1", augment="light")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "restarting the group" in p.stderr
    assert "resuming" in p.stderr and "at epoch 2, batch 1" in p.stderr
    run = tmp_path / "two"
    rows = epochs(run)
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (e, s) for e in (1, 2, 3) for s in ("train", "valid")
    ]  # no epoch logged twice or lost
    valid = [r["loss"] for r in rows if r["split"] == "valid"]
    assert valid == pytest.approx([h["valid_loss"] for h in ref.history], abs=1e-4)
    train_acc = [r["accuracy"] for r in rows if r["split"] == "train"]
    assert train_acc == pytest.approx([h["train_accuracy"] for h in ref.history], abs=1e-4)
    resumed = json.loads((run / "evaluation.json").read_text())
    assert (
        resumed["confusion_matrix"]
        == json.loads((tmp_path / "one" / "evaluation.json").read_text())["confusion_matrix"]
    )


def test_a_rank_failing_on_bad_input_stops_the_job_with_its_one_line_error(dataset, tmp_path):
    p = torchrun_train(dataset, tmp_path / "two", augment="light",
                       pythonpath=[HERE / "broken_disk"])  # fmt: skip
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: rank 1: [Errno 5] Input/output error")
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    assert not (tmp_path / "two" / "model").exists()


def test_sigterm_to_the_job_checkpoints_once_and_exits(dataset, tmp_path):
    run = tmp_path / "two"
    cmd, env = torchrun_cmd(dataset, run, augment="light", epochs=1000)  # it must be stopped
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "checkpoints" / "last.pt").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was ever written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.count("stopped: stopped by SIGTERM; checkpoint saved") == 1, err
    assert "--resume" in err and "Traceback" not in err
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(ck["rank_rng"]) == 2 and ck["step"] > 0
    assert not (run / "model").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "7", "--nproc-per-node", "2"],
         "error: --batch-size 7 is the global batch and does not split evenly over 2"),
        (["--nproc-per-node", "2", "--nnodes", "2"],
         "error: several machines (--nnodes) need --rdzv-endpoint HOST:PORT"),
    ],
)  # fmt: skip
def test_launcher_usage_errors_are_one_line_before_any_process_starts(
    dataset, tmp_path, cli, flags, message
):
    code, _, err = cli("train", "--data", dataset, "--output", tmp_path / "r", "--model",
                       "tiny_cnn", "--weights", "none", *flags)  # fmt: skip
    assert code == 2
    assert err.strip() == message or err.startswith(message), err
    assert not (tmp_path / "r").exists()
