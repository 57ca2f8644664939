"""A tuning study in MLflow: one parent run per study, one nested run per trial.

Trials are training runs, so each logs itself through the training callback
(:mod:`visiontune.tracking.mlflow_callback`) when the study's fixed config has a
``tracking:`` section; a trial's run directory (``STUDY/trials/0007``) tells the callback to
nest its run under the study's parent run, found or created here and recorded in
``STUDY/mlflow.json`` (under a file lock, since parallel workers start trials together).

:func:`log_study` closes the study in MLflow once it has run: every trial's state (complete,
pruned, failed) and reason as tags on its run (a trial that failed before training gets a
run of its own, with its reason), the best trial tagged, the best value and parameters on the
parent, and the study's report attached to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "mlflow.json"


@contextlib.contextmanager
def _locked(study_dir: Path) -> Iterator[None]:
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / "mlflow.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def study_parent_run(client: Any, uri: str, experiment_id: str, study_dir: Path) -> str:
    """The id of the study's parent run in ``uri`` (created on first use)."""
    from visiontune.io import atomic_write_json

    path = study_dir / STATE_FILE
    with _locked(study_dir):
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(path.read_text())
            if saved.get("tracking_uri") == uri and saved.get("run_id"):
                return saved["run_id"]
        run = client.create_run(
            experiment_id,
            run_name=study_dir.name,
            tags={"visiontune.kind": "study", "visiontune.study_dir": str(study_dir.resolve())},
        )
        atomic_write_json(
            path,
            {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id},
        )
        return run.info.run_id


def log_study(study: Any, study_dir: Path, report: Path | None = None) -> str | None:
    """Close the study's parent run: trial states and reasons, the best trial, the report.

    Does nothing (returns ``None``) when no trial was tracked. Returns the parent run id. A
    tracking failure is one warning line: it never costs the study its result.
    """
    import sys

    try:
        return _log_study(study, Path(study_dir), report)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"warning: could not log the study to MLflow: {first}", file=sys.stderr)
        return None


def _log_study(study: Any, study_dir: Path, report: Path | None) -> str | None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from visiontune.tuning._base import FAIL_REASON, PRUNED_AT_EPOCH, RUN_DIR
    from visiontune.tuning.trials import best_trial

    try:
        saved = json.loads((study_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    parent = saved["run_id"]
    chosen = best_trial(study)  # the study's choice (the untuned default may be kept)
    best_number = chosen.number if chosen is not None else None
    for trial in study.trials:
        state = trial.state.name
        reason = trial.user_attrs.get(FAIL_REASON)
        if state == "PRUNED" and not reason:
            reason = f"pruned after epoch {trial.user_attrs.get(PRUNED_AT_EPOCH)}"
        run_id = _trial_run_id(trial.user_attrs.get(RUN_DIR))
        if run_id is None:
            if state not in ("FAIL", "PRUNED"):
                continue
            # Failed before training started: no training run logged itself.
            run_id = client.create_run(
                saved["experiment_id"],
                run_name=f"{study_dir.name}/trial-{trial.number}",
                tags={"mlflow.parentRunId": parent, "visiontune.trial": str(trial.number)},
            ).info.run_id
            params = [Param(k, str(v)) for k, v in trial.params.items()]
            if params:
                client.log_batch(run_id, params=params)
            client.set_terminated(run_id, "FAILED" if state == "FAIL" else "KILLED")
        client.set_tag(run_id, "visiontune.trial_state", state.lower())
        if reason:
            client.set_tag(run_id, "visiontune.trial_reason", str(reason)[:5000])
        if trial.value is not None:
            client.log_metric(run_id, "trial_value", float(trial.value))
        if trial.number == best_number:
            client.set_tag(run_id, "visiontune.best_trial", "true")
            client.set_tag(parent, "visiontune.best_trial_run_id", run_id)
    if chosen is not None:
        best = chosen
        # Tags, not params: a continued study may find a new best.
        client.log_batch(
            parent,
            metrics=[Metric("best_value", float(best.value), 0, len(study.trials))],
        )
        for k, v in best.params.items():
            client.set_tag(parent, f"best.{k}", str(v))
        client.set_tag(parent, "visiontune.best_trial", str(best.number))
    if report is not None and Path(report).is_file():
        client.log_artifact(parent, str(report))
    client.set_terminated(parent, "FINISHED")
    return parent


def _trial_run_id(run_dir: str | None) -> str | None:
    if not run_dir:
        return None
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None
