"""The script objective: one tuning trial is one run of the user's script (one training job).

The trial's hyperparameters are the study's fixed ones plus the point the sampler drew, passed
to the script as ``--name value``. Every value of the objective metric is reported to Optuna as
it is printed (step = how many values came before), so the median rule prunes a trial while it
runs: the script is then stopped with SIGTERM, and SIGKILL after the grace period. The trial's
value is the metric's last value (SageMaker's), or its best with ``objective_value: best``. A
script that fails, runs past ``max_run``, or never prints the metric fails the trial with the
reason, and the study goes on.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from visiontune.script.config import parse_ranges
from visiontune.script.job import FAILED, STOPPED, ScriptJob, run_job
from visiontune.script.metrics import definitions_from_list
from visiontune.tuning._base import (
    DURATION_S,
    EPOCHS_RUN,
    FAIL_REASON,
    HOST,
    MODEL_DIR,
    PID,
    PRUNED_AT_EPOCH,
    RUN_DIR,
    TrialFailed,
)

PRUNED_PREFIX = "pruned by the median rule"


def trial_dir(study_dir: Path, number: int) -> Path:
    """Where trial ``number`` runs: ``STUDY_DIR/trials/0007`` (as the built-in objective)."""
    return (Path(study_dir) / "trials" / f"{number:04d}").resolve()


def script_job(script: dict[str, Any], hyperparameters: dict[str, Any], output: Path) -> ScriptJob:
    """The training job of a study's stored ``script`` settings with ``hyperparameters``."""
    return ScriptJob(
        entry_point=script["entry_point"],
        source_dir=Path(script["source_dir"]) if script.get("source_dir") else None,
        output=output,
        hyperparameters=hyperparameters,
        channels=dict(script.get("channels") or {}),
        metric_definitions=definitions_from_list(script.get("metric_definitions") or []),
        extra_args=list(script.get("extra_args") or []),
        python=script.get("python"),
        max_run=script.get("max_run"),
        stop_grace=float(script.get("stop_grace", 30.0)),
        endpoint_url=script.get("endpoint_url"),
        echo=bool(script.get("echo", False)),
    )


def run_script_trial(
    trial,
    script: dict[str, Any],
    fixed: dict[str, Any],
    params: dict[str, Any],
    objective: str,
    run_dir: Path,
    *,
    prune: bool = False,
    use: str = "last",
    minimize: bool = True,
) -> float:
    """Run one trial's script and return its objective value.

    Args:
        trial: the Optuna trial (``report``/``should_prune``/``set_user_attr`` are used).
        script: the study's script settings (entry point, channels, metric definitions...).
        fixed: hyperparameters every trial gets.
        params: this trial's drawn hyperparameters.
        objective: the metric definition name to optimise.
        run_dir: the trial's run directory.
        prune: ask the pruner after every printed value.
        use: ``last`` (SageMaker's) or ``best`` value of the metric.
        minimize: which way "best" is.

    Raises:
        optuna.TrialPruned: the pruner stopped it.
        TrialFailed: the script failed, ran past max_run, or never printed the metric.
    """
    import optuna

    if (run_dir / "job.json").exists():
        shutil.rmtree(run_dir)  # an earlier study's trial of the same number in this folder
    trial.set_user_attr(RUN_DIR, str(run_dir))
    trial.set_user_attr(HOST, socket.gethostname())
    trial.set_user_attr(PID, os.getpid())
    pruned_at: list[int] = []

    def on_metric(name: str, value: float, step: int) -> str | None:
        if name != objective or not math.isfinite(value):
            return None
        trial.report(value, step)
        if prune and trial.should_prune():
            pruned_at.append(step)
            return f"{PRUNED_PREFIX} at step {step}"
        return None

    result = run_job(script_job(script, {**fixed, **params}, run_dir), on_metric)
    values = result.metric_series.get(objective, [])
    trial.set_user_attr(EPOCHS_RUN, len(values))
    trial.set_user_attr(DURATION_S, result.duration_s)
    trial.set_user_attr(MODEL_DIR, result.model_dir)
    if pruned_at:
        trial.set_user_attr(PRUNED_AT_EPOCH, pruned_at[0])
        raise optuna.TrialPruned(f"pruned at step {pruned_at[0]}")
    if result.status in (FAILED, STOPPED):
        trial.set_user_attr(FAIL_REASON, (result.failure_reason or result.status)[:500])
        raise TrialFailed(result.failure_reason or result.status)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        reason = (
            f"the script never printed the objective metric {objective!r}"
            if not values
            else f"objective metric {objective!r} is {values[-1]}"
        )
        trial.set_user_attr(FAIL_REASON, reason)
        raise TrialFailed(reason)
    if use == "best":
        return (min if minimize else max)(finite)
    if not math.isfinite(values[-1]):
        trial.set_user_attr(FAIL_REASON, f"objective metric {objective!r} is {values[-1]}")
        raise TrialFailed(f"objective metric {objective!r} is {values[-1]}")
    return float(values[-1])


class ScriptObjective:
    """One trial = one run of the study's script (the ``script`` objective kind)."""

    def __init__(self, cfg: dict[str, Any], study_dir: Path) -> None:
        self.cfg = cfg
        self.space = parse_ranges(cfg["space"])
        self.study_dir = Path(study_dir)
        self.prune = cfg["strategy"] == "hyperband" or cfg["early_stopping"] == "auto"

    def __call__(self, trial) -> float:
        params = self.space.suggest(trial)
        return run_script_trial(
            trial,
            self.cfg["script"],
            self.cfg.get("fixed") or {},
            params,
            self.cfg["objective"],
            trial_dir(self.study_dir, trial.number),
            prune=self.prune,
            use=self.cfg.get("objective_value", "last"),
            minimize=self.cfg["direction"] == "minimize",
        )
