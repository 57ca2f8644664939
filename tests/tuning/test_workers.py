"""Parallel workers on one machine, and a tune job killed with SIGKILL then re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _args(data: Path, space: Path, study: str, trials: int, *extra: str) -> list[str]:
    return [
        "tune",
        "--data",
        str(data),
        "--space",
        str(space),
        "--study",
        study,
        "--max-trials",
        str(trials),
        "--batch-size",
        "4",
        "--set",
        "model=tiny_cnn",
        "--weights",
        "none",
        "--trainable",
        "all",
        "--workers",
        "0",
        "--heartbeat",
        "1",
        *extra,
    ]


def test_parallel_trials_land_once_each(tiny_data, tmp_path, vt, study_of):
    space = tmp_path / "space.yaml"
    space.write_text(
        "lr: {type: continuous, min: 0.005, max: 0.05, scaling: log}\n"
        "epochs: {type: integer, min: 1, max: 2}\n"
    )
    out = vt(*_args(tiny_data, space, "par", 4, "--parallel", "2"), cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr
    study = study_of("par", str(tmp_path / "studies/par/journal.log"))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    # the two workers drew different configurations (each seeds its own sampler)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    # two worker processes shared the work, and every trial has its own run directory
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    dirs = sorted(p.name for p in (tmp_path / "studies/par/trials").iterdir())
    assert dirs == ["0000", "0001", "0002", "0003"]


def test_sigkill_loses_no_completed_trial(tiny_data, tmp_path, study_of, vt_env):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: continuous, min: 0.005, max: 0.05, scaling: log}\n")
    args = _args(tiny_data, space, "kill", 5, "--epochs", "6")
    cmd = [sys.executable, "-c", "from visiontune.cli import main; main()", *args]
    journal = tmp_path / "studies/kill/journal.log"
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=vt_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trials_dir = tmp_path / "studies/kill/trials"

    def mid_trial() -> bool:
        # Two trials wrote their model; a third has checkpointed an epoch but not finished.
        runs = sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []
        done = [r for r in runs if (r / "model" / "model.json").exists()]
        going = [r for r in runs if (r / "checkpoints" / "last.pt").exists() and r not in done]
        return len(done) >= 2 and len(going) == 1

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not mid_trial():
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: t for t in study_of("kill", str(journal)).get_trials()}
    done_before = {n: t for n, t in before.items() if t.state.name == "COMPLETE"}
    killed = [n for n, t in before.items() if t.state.name == "RUNNING"]
    assert len(done_before) >= 2 and len(killed) == 1
    stamps = {
        n: Path(t.user_attrs["model_dir"], "model.json").stat().st_mtime_ns
        for n, t in done_before.items()
    }

    rerun = subprocess.run(
        cmd, cwd=tmp_path, env=vt_env, capture_output=True, text=True, timeout=240
    )
    assert rerun.returncode == 0, rerun.stderr
    after = {t.number: t for t in study_of("kill", str(journal)).get_trials()}
    complete = [t for t in after.values() if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    for n, t in done_before.items():  # kept, with the same result, and not trained again
        assert after[n].state.name == "COMPLETE" and after[n].value == t.value
        assert Path(t.user_attrs["model_dir"], "model.json").stat().st_mtime_ns == stamps[n]
    # the trial the kill interrupted was failed by its stale heartbeat and retried with the
    # same parameters
    assert after[killed[0]].state.name == "FAIL"
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].params == before[killed[0]].params
    assert retries[0].state.name == "COMPLETE"


def test_parallel_workers_each_get_a_gpu_of_their_own(monkeypatch):
    from visiontune.config import TrainConfig, build_config
    from visiontune.tuning import distributed
    from visiontune.tuning.study import _worker_gpus
    from visiontune.tuning.workers import worker_envs

    # Every --parallel worker trained on the first GPU, whatever the machine had.
    monkeypatch.setattr(distributed, "uses_cuda", lambda device: True)
    monkeypatch.setattr(distributed, "visible_gpus", lambda: ["0", "1"])
    fixed = build_config(TrainConfig, None, {"data": "x", "device": "auto"})
    gpus = _worker_gpus(fixed, trial_nproc=1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(3, 1, gpus)] == ["0", "1", "0"]
    # A trial of several processes takes its GPUs by worker index (tuning.distributed).
    assert _worker_gpus(fixed, trial_nproc=2) is None
    cpu = build_config(TrainConfig, None, {"data": "x", "device": "cpu"})
    assert _worker_gpus(cpu, trial_nproc=1) is None
