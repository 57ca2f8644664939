"""A tuning job over a user's script: the built-in tuning job's study, storage, strategies,
budgets, workers, status, report and warm start, with trials that run the script.

The study's stored config says ``kind: script`` and holds the script settings (entry point,
source dir, channels, metric definitions, max_run), so ``visiontune tune worker --study NAME``
on any machine that has the script at the same path joins it with only the name and storage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.script.job import JobResult, ScriptJob, run_job
from visiontune.script.metrics import MetricDefinition
from visiontune.tuning.space import SearchSpace


def script_settings(job: ScriptJob) -> dict[str, Any]:
    """What a worker needs to run ``job``'s script, as plain data stored in the study."""
    from visiontune.script.job import resolve_entry_point

    source_dir, entry = resolve_entry_point(job.entry_point, job.source_dir)
    channels = {
        k: v if "://" in v else str(Path(v).expanduser().absolute())
        for k, v in job.channels.items()
    }
    return {
        "entry_point": entry,
        "source_dir": str(source_dir),
        "channels": channels,
        "metric_definitions": [d.to_dict() for d in job.metric_definitions],
        "extra_args": list(job.extra_args),
        "python": job.python,
        "max_run": job.max_run,
        "stop_grace": job.stop_grace,
        "endpoint_url": job.endpoint_url,
    }


def check_script_study(
    job: ScriptJob, space: SearchSpace, objective: str, definitions: list[MetricDefinition]
) -> None:
    """Fail before any trial: unknown objective metric, a tuned name also fixed, bad channels.

    Raises:
        UserError: what is wrong, in one line.
    """
    from visiontune.script.channels import resolve_channel

    names = [d.name for d in definitions]
    if objective not in names:
        raise UserError(
            f"--objective-metric {objective!r} is not one of the metric definitions "
            f"({', '.join(names) or 'none: add --metric NAME=REGEX'})"
        )
    both = sorted(set(space.names) & set(job.hyperparameters))
    if both:
        raise UserError(f"{', '.join(both)}: both fixed (--hyperparameters) and tuned (the space)")
    for name, where in job.channels.items():
        resolve_channel(name, where, job.endpoint_url)  # s3:// prefixes are copied once, here


def tune_script(
    settings,
    job: ScriptJob,
    space: SearchSpace,
    *,
    objective_value: str = "last",
    echo: bool = True,
):
    """Run (or continue) a tuning job whose trials run ``job``'s script.

    Args:
        settings: a :class:`visiontune.tuning.study.TuneSettings` (``objective`` is the metric
            definition's name; ``direction`` minimize or maximize).
        job: the script, its fixed hyperparameters, channels and metric definitions
            (``output`` is unused: trials run in ``STUDY_DIR/trials/NNNN``).
        space: the tuned hyperparameters' ranges.
        objective_value: ``last`` (SageMaker's) or ``best`` value of the metric in a trial.
        echo: stream the final (``--train-best``) run's output to this process's.

    Returns:
        a :class:`visiontune.tuning.study.TuneResult`.

    Raises:
        UserError: bad input, before any trial runs.
    """
    from visiontune.tuning.study import study_result

    storage_url, study_dir = create_script_study(settings, job, space, objective_value)
    study_dir.mkdir(parents=True, exist_ok=True)
    _run_workers(settings, storage_url, study_dir)
    study, result = study_result(settings, storage_url, study_dir)
    if settings.train_best:
        train_best_script(study, study_dir / "best", echo=echo)
        result.best_run = study_dir / "best"
    return result


def create_script_study(
    settings, job: ScriptJob, space: SearchSpace, objective_value: str = "last"
) -> tuple[str, Path]:
    """Check everything, then create the script study (or load it to continue).

    Returns:
        ``(storage_url, study_dir)``.

    Raises:
        UserError: bad input, or a study of that name with other settings.
    """
    import optuna

    from visiontune.tuning._base import ATTR, FORMAT, quiet_optuna
    from visiontune.tuning.storage import default_storage, open_storage, redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.direction not in ("minimize", "maximize"):
        raise UserError("--objective-type must be minimize or maximize for a script")
    if objective_value not in ("last", "best"):
        raise UserError("--objective-value must be last or best")
    check_script_study(job, space, settings.objective, job.metric_definitions)
    if settings.strategy == "grid":
        space.grid()
    study_dir = settings.resolved_study_dir()
    storage_url = settings.storage or default_storage(study_dir)
    storage = open_storage(storage_url, heartbeat=settings.heartbeat, max_retry=settings.max_retry)
    from visiontune.tuning.study import _warm_start, _warm_start_sources  # the built-in job's

    warm_sources = _warm_start_sources(settings, storage_url)  # before the study exists
    payload = {
        "format": FORMAT,
        "kind": "script",
        "script": script_settings(job),
        "fixed": dict(job.hyperparameters),
        "space": space.to_dict(),
        "objective": settings.objective,
        "objective_value": objective_value,
        "direction": settings.direction,
        "strategy": settings.strategy,
        "early_stopping": settings.early_stopping,
        "max_trials": settings.max_trials,
        "seed": settings.seed,
        "max_retry": settings.max_retry,
        "keep_checkpoints": settings.keep_checkpoints,
    }
    with quiet_optuna():
        try:
            study = optuna.create_study(
                study_name=settings.study,
                storage=storage,
                direction=settings.direction,
                load_if_exists=True,
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot use storage {redact(storage_url)}: {first}") from e
    existing = study.user_attrs.get(ATTR)
    if existing is None:
        study.set_user_attr(ATTR, payload)
    else:
        for key in ("kind", "script", "fixed", "space", "objective", "direction", "strategy"):
            if existing.get(key) != payload[key]:
                raise UserError(
                    f"study {settings.study!r} already exists with a different {key}; continue "
                    "it with the same options, or start a new one with --study NAME"
                )
        changed = {k: payload[k] for k in ("max_trials", "keep_checkpoints", "max_retry")}
        if any(existing.get(k) != v for k, v in changed.items()):
            study.set_user_attr(ATTR, {**existing, **changed})
    _warm_start(study, warm_sources, space)  # a continued study too, each seed once
    return storage_url, study_dir


def _run_workers(settings, storage_url: str, study_dir: Path) -> None:
    from visiontune.tuning.study import run_local_worker
    from visiontune.tuning.workers import spawn_workers, wait_workers

    if settings.parallel == 1:
        run_local_worker(settings, storage_url, study_dir, timeout=settings.timeout)
        return
    procs = spawn_workers(
        settings.parallel,
        settings.study,
        storage_url,
        study_dir,
        heartbeat=settings.heartbeat,
        timeout=settings.timeout,
    )
    wait_workers(procs)


def train_best_script(study, output: Path, *, echo: bool = True) -> JobResult | None:
    """Run the script once more with the best trial's hyperparameters, into ``output``.

    As the built-in ``train_best``: when ``output`` already holds a run from the current best
    trial, nothing runs (returns ``None``); otherwise the previous final run is moved aside
    while the new one runs, and put back if the script does not complete.

    Raises:
        UserError: the study has no complete trial, is not a script study, or the final run
            did not complete.
    """
    from visiontune.script.objective import script_job
    from visiontune.tuning.storage import study_config
    from visiontune.tuning.study import retrain_best

    cfg = study_config(study)
    if cfg.get("kind") != "script":
        raise UserError(f"study {study.study_name!r} does not tune a script")
    start = time.monotonic()

    def run(t) -> JobResult:
        job = script_job(cfg["script"], {**cfg.get("fixed", {}), **t.params}, output)
        job.echo = echo
        print(f"training the best configuration (trial {t.number}) in {output}", file=sys.stderr)
        result = run_job(job)
        if not result.ok:
            raise UserError(
                f"the final run with trial {t.number}'s hyperparameters did not complete "
                f"({result.failure_reason}); see {output}/logs"
            )
        return result

    _, result = retrain_best(study, output, "job.json", run)
    if result is not None:
        print(f"final run done in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return result
