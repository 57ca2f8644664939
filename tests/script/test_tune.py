"""Tuning over a user's script: best trial, failures that do not stop the study, pruning."""

from __future__ import annotations

import json

import pytest
from helpers import HYMENOPTERA

from visiontune.io import read_jsonl
from visiontune.script.objective import run_script_trial

LOSS = "average test loss=Average loss: ([0-9\\.]+)"


def _study_rows(vt, study_dir):
    proc = vt("tune", "status", "s", "--study-dir", study_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tune_six_trials_in_parallel_picks_the_best_printed_metric(vt, scripts, channel, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "lr: CategoricalParameter([0.001, 0.003, 0.01, 0.03, 0.1, 1.0])\n"
        "optimizer: {type: categorical, values: [sgd]}\n"
    )
    study_dir = tmp_path / "study"
    # The real photos where the checkout has them (the script only counts its files).
    data = HYMENOPTERA / "train" if HYMENOPTERA.is_dir() else channel
    proc = vt(
        "tune", "--entry-point", scripts / "train.py", "--channel", f"training={data}",
        "--hp", "epochs=2", "--metric", LOSS, "--objective-metric", "average test loss",
        "--objective-type", "minimize", "--space", space, "--max-trials", "6",
        "--parallel", "2", "--strategy", "grid", "--study", "s", "--study-dir", study_dir,
        "--train-best", "--json", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # Worker processes say when they are done; the summary is the JSON object after that.
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") :])
    assert summary["trials"] == {"COMPLETE": 6}
    # The best trial is the one whose script printed the lowest last loss.
    printed = {}
    for row in _study_rows(vt, study_dir):
        series = [r["average test loss"] for r in read_jsonl(f"{row['run_dir']}/metrics.jsonl")]
        printed[row["number"]] = series[-1]
        assert row["value"] == series[-1]
    best = summary["best"]
    assert best["value"] == min(printed.values()) == printed[best["trial"]]
    assert best["params"]["lr"] == 0.01
    # --train-best ran the script once more with those hyperparameters, model packed.
    final = json.loads((study_dir / "best" / "job.json").read_text())
    assert final["status"] == "Completed"
    assert final["hyperparameters"] == {"epochs": 2, "lr": 0.01, "optimizer": "sgd"}
    assert (study_dir / "best" / "model.tar.gz").is_file()


def test_failed_silent_and_hanging_trials_are_recorded_and_the_study_goes_on(
    vt, scripts, channel, tmp_path
):
    space = tmp_path / "space.yaml"
    space.write_text("lr: CategoricalParameter([0.2, 0.3, 0.4, 0.05])\n")
    study_dir = tmp_path / "study"
    proc = vt(
        "tune", "--entry-point", scripts / "flaky.py", "--channel", channel, "--metric", LOSS,
        "--objective-metric", "average test loss", "--objective-type", "minimize",
        "--space", space, "--max-trials", "4", "--strategy", "grid", "--max-run", "3",
        "--study", "s", "--study-dir", study_dir, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["params"]["lr"]: r for r in _study_rows(vt, study_dir)}
    assert rows[0.05]["state"] == "COMPLETE" and rows[0.05]["value"] == 0.05
    assert rows[0.2]["state"] == "FAIL"
    assert "ValueError: loss is nan at step 3" in rows[0.2]["fail_reason"]
    assert rows[0.3]["state"] == "FAIL"
    assert "never printed the objective metric" in rows[0.3]["fail_reason"]
    assert rows[0.4]["state"] == "FAIL"
    assert rows[0.4]["fail_reason"].startswith("MaxRuntimeExceeded")


@pytest.fixture
def study():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )


def _script(scripts, channel) -> dict:
    return {
        "entry_point": "train.py",
        "source_dir": str(scripts),
        "channels": {"training": str(channel)},
        "metric_definitions": [{"Name": "loss", "Regex": "Average loss: ([0-9\\.]+)"}],
        "stop_grace": 5,
    }


def test_the_median_rule_prunes_a_running_script(study, scripts, channel, tmp_path):
    import optuna

    script = _script(scripts, channel)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 10, log=True)
        return run_script_trial(
            trial,
            script,
            {"epochs": 40 if lr > 1 else 3, "sleep": 0.1},
            {"lr": lr},
            "loss",
            tmp_path / f"t{trial.number}",
            prune=True,
        )

    for lr in (0.01, 0.01, 5.0):
        study.enqueue_trial({"lr": lr})
    study.optimize(objective, n_trials=3)
    done, _, pruned = study.trials
    assert done.state == optuna.trial.TrialState.COMPLETE and done.value == pytest.approx(
        1 / 3, abs=1e-3
    )
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.user_attrs["pruned_at_epoch"] == 0
    job = json.loads((tmp_path / "t2" / "job.json").read_text())
    assert job["status"] == "Stopped" and job["failure_reason"].startswith("pruned by the median")
    # Stopped after its first value, long before its 40 epochs.
    assert len(read_jsonl(tmp_path / "t2" / "metrics.jsonl")) < 40


def test_best_value_instead_of_last(study, scripts, channel, tmp_path):
    script = _script(scripts, channel)
    trial = study.ask({"lr": __import__("optuna").distributions.FloatDistribution(0.001, 1)})
    value = run_script_trial(
        trial, script, {"epochs": 3}, {"lr": 0.1}, "loss", tmp_path / "t", use="best"
    )
    assert value == 1 + 1 / 3 or value == pytest.approx(1.3333)


def test_notebook_file_flags_win_and_warm_start(vt, scripts, channel, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"estimator:\n  entry_point: train.py\n  source_dir: {scripts}\n"
        "  hyperparameters: {epochs: 1}\n"
        "  metric_definitions: [{Name: loss, Regex: 'Average loss: ([0-9\\.]+)'}]\n"
        "tuner:\n  objective_metric_name: loss\n  objective_type: Minimize\n"
        "  hyperparameter_ranges: {lr: 'ContinuousParameter(0.001, 0.1)'}\n"
        "  max_jobs: 6\n  max_parallel_jobs: 2\n"
        f"inputs: {channel}\n"
    )
    first = tmp_path / "first"
    proc = vt("tune", "--job-config", job, "--max-trials", "2", "--parallel", "1",
              "--study", "a", "--study-dir", first)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "study a: 2 complete" in proc.stdout  # --max-trials 2 beat max_jobs: 6
    assert "worker done" not in proc.stdout  # --parallel 1 beat max_parallel_jobs: 2
    proc = vt("tune", "--job-config", job, "--max-trials", "1", "--parallel", "1",
              "--study", "b", "--study-dir", tmp_path / "second", "--warm-start", first)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "seeded the sampler with 2 earlier trial(s)" in proc.stderr
