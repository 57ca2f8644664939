"""``visiontune tune``: hyperparameter tuning, and its ``worker``, ``status``, ``best`` and
``report`` subcommands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from visiontune.cli import app
from visiontune.tuning._base import STUDIES_ROOT  # names only: no optuna, no torch

_STUDY_DIR_HELP = f"Default: {STUDIES_ROOT}/STUDY."

_HELP = """Tune hyperparameters: every trial is a training run (an Optuna study).

Run a study: visiontune tune --data DATA --space SPACE.yaml [--set KEY=VALUE ...]

The space file maps training options to ranges (type: continuous, integer or categorical).
All other training options are fixed: --config FILE, the flags below, --set KEY=VALUE.
Re-running the same command continues the study.

Subcommands: worker (join a study from any machine), status, best, report.
"""

tune_app = typer.Typer(help=_HELP, no_args_is_help=False, invoke_without_command=True)
app.add_typer(tune_app, name="tune")


def _storage_for(study: str, storage: str | None, study_dir: Path | None) -> tuple[str, Path]:
    from visiontune.errors import UserError
    from visiontune.tuning._base import default_study_dir
    from visiontune.tuning.storage import default_storage

    sdir = study_dir or default_study_dir(study)
    if storage:
        return storage, sdir
    if not (sdir / "journal.log").is_file():
        raise UserError(
            f"no study at {sdir} (no journal.log); give --study-dir DIR or --storage URL"
        )
    return default_storage(sdir), sdir


@tune_app.callback()
def tune(
    ctx: typer.Context,
    data: str = typer.Option(None, "--data", "-d", help="Dataset folder, s3:// prefix or name."),
    space: Path = typer.Option(None, "--space", "-s", help="YAML file of ranges."),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML file of fixed training options."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Fixed training option KEY=VALUE (repeatable)."
    ),
    objective: str = typer.Option(
        None,
        help="Metric to optimise (any logged metric; default valid_loss, valid_accuracy on "
        "small data).",
    ),
    direction: str = typer.Option("auto", help="minimize | maximize | auto (loss: minimize)."),
    max_trials: int = typer.Option(
        10, "--max-trials", help="Finished (complete + pruned) trials wanted."
    ),
    parallel: int = typer.Option(1, help="Trials at once, as separate worker processes."),
    trial_nproc: int = typer.Option(
        1,
        "--trial-nproc",
        help="Processes per trial: above 1, each trial trains data-parallel on torchrun "
        "(--batch-size is the global batch). Combines with --parallel.",
    ),
    strategy: str = typer.Option("bayesian", help="bayesian (TPE) | random | grid | hyperband."),
    early_stopping: str = typer.Option("off", "--early-stopping", help="off | auto (median rule)."),
    study: str = typer.Option("visiontune", "--study", help="Study name."),
    study_dir: Path = typer.Option(None, "--study-dir", help=_STUDY_DIR_HELP),
    storage: str = typer.Option(None, help="postgresql://... (default: STUDY_DIR/journal.log)."),
    timeout: float = typer.Option(None, help="Stop starting trials after this many seconds."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study (the default anyway)."),
    warm_start: list[str] = typer.Option(None, "--warm-start", help="Earlier study name or dir."),
    max_retry: int = typer.Option(2, "--max-retry", help="Retries of a trial whose worker died."),
    heartbeat: int = typer.Option(10, help="Seconds between trial heartbeats."),
    train_best: bool = typer.Option(
        False, "--train-best", help="Then train STUDY_DIR/best (again, if the best changed)."
    ),
    keep_checkpoints: str = typer.Option(
        "models",
        "--keep-checkpoints",
        help="What finished trials keep: models (of complete and pruned trials; checkpoints "
        "dropped) | best (the best trial's model only) | all | none.",
    ),
    cv: str = typer.Option(
        "auto",
        "--cv",
        help="Cross-validated objective: K folds of train+valid per trial (--train-best then "
        "refits on train+valid) | 0 (off) | auto (on when valid has < 20 images per class "
        "and trials train on cached features).",
    ),
    baseline: bool = typer.Option(
        True,
        "--baseline/--no-baseline",
        help="A new study's first trial is the untuned default, and the study keeps it unless "
        "a trial beats it by more than the objective's noise.",
    ),
    seed: int = typer.Option(None, help="Seed of training and of the sampler."),
    model: str = typer.Option(None, help="Backbone (fixed)."),
    weights: str = typer.Option(None, help="imagenet | none | PATH (fixed)."),
    trainable: str = typer.Option(None, help="head | all | last:N (fixed)."),
    augment: str = typer.Option(None, help="none | light | strong (fixed)."),
    augment_views: int = typer.Option(
        None, help="Cached augmented views per image, frozen backbone (fixed, if not in the space)."
    ),
    lr: float = typer.Option(None, help="Learning rate (fixed, if not in the space)."),
    batch_size: int = typer.Option(None, help="Batch size (fixed, if not in the space)."),
    epochs: int = typer.Option(None, help="Epochs (fixed, if not in the space)."),
    workers: int = typer.Option(None, help="DataLoader workers."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    limit_per_class: int = typer.Option(None, help="Use at most N images per class."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    entry_point: str = typer.Option(
        None, "--entry-point", help="Tune your own training script (script mode)."
    ),
    job_config: Path = typer.Option(
        None, "--job-config", help="Script mode: YAML of the notebook's estimator/tuner/inputs."
    ),
    source_dir: Path = typer.Option(None, "--source-dir", help="Script mode: the script's folder."),
    hyperparameters: list[str] = typer.Option(
        None, "--hyperparameters", "--hp", help="Script mode: fixed NAME=VALUE (repeatable)."
    ),
    channel: list[str] = typer.Option(
        None, "--channel", help="Script mode: NAME=FOLDER or NAME=s3://PREFIX (repeatable)."
    ),
    metric: list[str] = typer.Option(
        None, "--metric", help="Script mode: NAME=REGEX metric definition (repeatable)."
    ),
    metric_definitions: list[str] = typer.Option(
        None, "--metric-definitions", help="Script mode: YAML/JSON [{Name, Regex}] file."
    ),
    objective_metric: str = typer.Option(
        None, "--objective-metric", help="Script mode: the metric definition to optimise."
    ),
    objective_type: str = typer.Option(
        None, "--objective-type", help="Script mode: minimize | maximize."
    ),
    objective_value: str = typer.Option(
        "last", "--objective-value", help="Script mode: last (SageMaker's) or best value."
    ),
    max_run: float = typer.Option(
        None, "--max-run", help="Script mode: seconds before a trial's script is stopped."
    ),
    endpoint_url: str = typer.Option(None, help="Script mode: S3 endpoint for s3:// channels."),
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    options = dict(locals())  # every option by name, for the steps below
    if entry_point or job_config:
        _tune_script(options)
        return
    if space is None and data is None and config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    ranges, fixed = _space_and_fixed_options(options)
    settings = _tune_settings(options)
    del resume  # continuing is what re-running does; the flag documents intent
    _echo_result(_run_study(settings, fixed, ranges), json_out)


def _tune_script(options: dict[str, Any]) -> None:
    """Script mode (``--entry-point`` or ``--job-config``): trials run the user's script."""
    from visiontune.cli.script import tune_script_command

    if options["trial_nproc"] != 1:
        from visiontune.errors import UserError

        raise UserError("--trial-nproc runs visiontune's own training; a script trial is one job")
    tune_script_command(**options)


# The flags that fix a training option (unless the space tunes it), in TrainConfig's names.
_FIXED_FLAGS = (
    "data",
    "seed",
    "model",
    "weights",
    "trainable",
    "augment",
    "augment_views",
    "lr",
    "batch_size",
    "epochs",
    "workers",
    "device",
    "limit_per_class",
)


def _space_and_fixed_options(options: dict[str, Any]) -> tuple[Any, Any]:
    """The ranges (--space) and the fixed training options (--config, the flags, --set).

    Raises:
        UserError: no --space, nothing to train on, or a bad space file or option.
    """
    from visiontune.config import TrainConfig, build_config, parse_overrides
    from visiontune.errors import UserError
    from visiontune.tuning.space import load_space

    set_ = options["set_"] or []
    if options["space"] is None:
        raise UserError("say what to tune: --space SPACE.yaml (see examples/dogbreed-tuning.yaml)")
    given_data = any(s.startswith("data=") for s in set_)
    if options["data"] is None and options["config"] is None and not given_data:
        raise UserError("say what to train on: --data DATA (a folder, s3:// prefix or name)")
    ranges = load_space(options["space"])
    flags: dict[str, Any] = {k: options[k] for k in _FIXED_FLAGS if options[k] is not None}
    flags.update(parse_overrides(set_))
    return ranges, build_config(TrainConfig, options["config"], flags)


# The options that are TuneSettings fields as they are.
_SETTINGS_OPTIONS = (
    "study",
    "storage",
    "objective",
    "direction",
    "max_trials",
    "parallel",
    "trial_nproc",
    "strategy",
    "early_stopping",
    "timeout",
    "max_retry",
    "heartbeat",
    "seed",
    "train_best",
    "keep_checkpoints",
    "baseline",
)


def _tune_settings(options: dict[str, Any]):
    """How to tune (a ``TuneSettings``), from the study's options.

    Raises:
        UserError: a bad value (--cv, --strategy, --direction...), naming its flag.
    """
    from visiontune.cli.tune_shared import tune_settings

    study_dir = options["study_dir"]
    given = {k: options[k] for k in _SETTINGS_OPTIONS}
    if given["objective"] is None:  # unnamed: TuneSettings' default, or small data's choice
        del given["objective"]
    return tune_settings(
        **given,
        study_dir=str(study_dir) if study_dir else None,
        warm_start=list(options["warm_start"] or []),
        cv=_cv_option(options["cv"]),
    )


def _run_study(settings, fixed, ranges):
    """Run the study; Ctrl-C (or SIGTERM) stops it with a line saying how to continue."""
    import signal

    from visiontune.train import TrainingInterrupted
    from visiontune.tuning.study import tune as run_tune

    try:
        return run_tune(settings, fixed, ranges)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        # The interrupted trial is failed and queued again (tuning.workers.requeue); finished
        # ones are in the study already. KeyboardInterrupt: --parallel workers were stopped.
        typer.echo(
            "stopped; completed trials are kept, re-run the same command to continue", err=True
        )
        raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None


def _echo_result(result, json_out: bool) -> None:
    """The study's counts, best trial, report and final run: as lines or as JSON."""
    from visiontune.cli.tune_shared import echo_counts_and_best

    summary = {
        "study": result.study,
        "study_dir": str(result.study_dir),
        "storage": result.storage,
        "trials": result.counts,
        "best": result.best,
        "report": str(result.report) if result.report else None,
        "best_run": str(result.best_run) if result.best_run else None,
    }
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    echo_counts_and_best(result)
    if result.best:
        typer.echo(f"best model: {result.best['model_dir']}")
    if result.report:
        typer.echo(f"report: {result.report}")
    if result.best_run:
        typer.echo(f"final model trained in {result.best_run}")


def _cv_option(value: str) -> int | str:
    """``--cv auto`` or a number of folds (0: off)."""
    from visiontune.errors import UserError

    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--cv must be auto, 0 (off) or a number of folds, got {value!r}") from None


@tune_app.command()
def worker(
    study: str = typer.Option(..., "--study", help="Study name."),
    storage: str = typer.Option(None, help="Shared storage URL (default: STUDY_DIR/journal.log)."),
    study_dir: Path = typer.Option(
        None,
        "--study-dir",
        help=f"Where this machine writes trial runs (default {STUDIES_ROOT}/STUDY).",
    ),
    heartbeat: int = typer.Option(10, help="Seconds between trial heartbeats."),
    timeout: float = typer.Option(None, help="Stop starting trials after this many seconds."),
    worker_index: int = typer.Option(
        None,
        "--worker-index",
        help="This worker's index (seeds its sampler; default: from host and process id).",
    ),
    trial_nproc: int = typer.Option(
        1, "--trial-nproc", help="Processes per trial (torchrun above 1)."
    ),
) -> None:
    """Join a study and run trials until it has its budget (run on any number of machines)."""
    from visiontune.tuning.workers import run_worker

    url, sdir = _storage_for(study, storage, study_dir)
    try:
        n = run_worker(
            study,
            url,
            sdir,
            heartbeat=heartbeat,
            timeout=timeout,
            worker=worker_index,
            trial_nproc=trial_nproc,
        )
    except Exception as e:  # Ctrl-C or SIGTERM in a trial: one line, as tune says it
        import signal

        from visiontune.tuning.workers import is_interrupt

        if not is_interrupt(e):
            raise
        typer.echo("worker stopped; its trial is queued again for the next run", err=True)
        raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None
    typer.echo(f"worker done: ran {n} trial(s) of study {study}")


@tune_app.command()
def status(
    study: str = typer.Argument(..., help="Study name."),
    storage: str = typer.Option(None, help="Storage URL (default: STUDY_DIR/journal.log)."),
    study_dir: Path = typer.Option(None, "--study-dir", help=_STUDY_DIR_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the trials as JSON."),
) -> None:
    """A table of the study's trials: state, params, objective, epochs, duration, pruning."""
    from visiontune.tuning.storage import load_study, study_config
    from visiontune.tuning.trials import trial_cells, trial_rows

    url, _ = _storage_for(study, storage, study_dir)
    s = load_study(study, url)
    rows = trial_rows(s)
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.table import Table

    from visiontune.tuning.trials import CELL_HEADERS

    cfg = study_config(s)
    table = Table(
        title=f"study {study} ({cfg['direction']} {cfg['objective']}, budget {cfg['max_trials']})"
    )
    for header in CELL_HEADERS:
        # Long cells fold onto more lines in a narrow terminal instead of losing their end.
        table.add_column(cfg["objective"] if header == "objective" else header, overflow="fold")
    for r in rows:
        table.add_row(*trial_cells(r))
    _table_console().print(table)


def _table_console():
    """A terminal gets tables at its width; a pipe or file gets them whole, at the width they
    need (rich would otherwise assume 80 columns and cut them)."""
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, soft_wrap=False)


@tune_app.command()
def best(
    study: str = typer.Argument(..., help="Study name."),
    storage: str = typer.Option(None, help="Storage URL (default: STUDY_DIR/journal.log)."),
    study_dir: Path = typer.Option(None, "--study-dir", help=_STUDY_DIR_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    train_best: bool = typer.Option(False, "--train-best", help="Train STUDY_DIR/best with them."),
) -> None:
    """The best hyperparameters and the path to that trial's model."""
    from visiontune.errors import UserError
    from visiontune.tuning.storage import load_study, study_config
    from visiontune.tuning.study import train_best as run_train_best
    from visiontune.tuning.trials import best_summary

    url, sdir = _storage_for(study, storage, study_dir)
    s = load_study(study, url)
    summary = best_summary(s)
    if summary is None:
        raise UserError(f"study {study!r} has no complete trial yet")
    if train_best and study_config(s).get("kind") == "script":
        from visiontune.script.tune import train_best_script

        train_best_script(s, sdir / "best")
        summary["best_run"] = str(sdir / "best")
    elif train_best:
        from visiontune.train import TrainingInterrupted

        try:
            summary["best_run"] = str(run_train_best(s, sdir / "best"))
        except TrainingInterrupted as e:  # Ctrl-C: one line, as tune itself says it
            typer.echo(
                "stopped; the final model is not trained: run the same command again to train it",
                err=True,
            )
            raise typer.Exit(128 + e.signum) from None
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"best trial {summary['trial']}: {summary['objective']}={summary['value']:.6g}")
    for k, v in summary["params"].items():
        typer.echo(f"  {k}: {v}")
    if summary.get("selection"):  # how the untuned default was weighed (tuning.baseline)
        typer.echo(summary["selection"])
    typer.echo(f"model: {summary['model_dir']}")
    if "best_run" in summary:
        typer.echo(f"final model trained in {summary['best_run']}")


@tune_app.command()
def report(
    study: str = typer.Argument(..., help="Study name."),
    output: Path = typer.Option(None, "--output", "-o", help="Default: STUDY_DIR/report.html."),
    storage: str = typer.Option(None, help="Storage URL (default: STUDY_DIR/journal.log)."),
    study_dir: Path = typer.Option(None, "--study-dir", help=_STUDY_DIR_HELP),
) -> None:
    """Write the self-contained HTML tuning report (plots work offline)."""
    from visiontune.tuning.report import write_report
    from visiontune.tuning.storage import load_study

    url, sdir = _storage_for(study, storage, study_dir)
    path = write_report(load_study(study, url), output or sdir / "report.html")
    typer.echo(f"report: {path}")
