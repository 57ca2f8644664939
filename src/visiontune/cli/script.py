"""``visiontune run``: a SageMaker script-mode training job from the user's own script."""

from __future__ import annotations

from pathlib import Path

import typer

from visiontune.cli import app

_RUN_HELP = """Run a SageMaker training script (script mode) locally, unchanged.

The script gets SageMaker's training environment (SM_CHANNEL_*, SM_MODEL_DIR, SM_HPS, ...,
input/config/*.json) with RUN as /opt/ml, and its hyperparameters as --name value arguments.
Its output is streamed and saved in RUN/logs/; --metric regexes fill RUN/metrics.jsonl; RUN/model
is packed as RUN/model.tar.gz; RUN/job.json records the status and the failure reason.
Arguments after -- are passed to the script as they are.
"""


def parse_hyperparameter_options(specs: list[str]) -> dict:
    """``["lr=0.01", "epochs=3", "optimizer=sgd"]`` -> ``{"lr": 0.01, "epochs": 3, ...}``.

    Whole numbers become ints and other numbers floats (SM_HPS then holds numbers, as from a
    notebook); everything else stays the string it was.
    """
    from visiontune.errors import UserError

    out: dict = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--hyperparameters {spec!r}: use NAME=VALUE, e.g. lr=0.01")
        if key in out:
            # The last one won without a word; in a long command the first looked set.
            raise UserError(f"hyperparameter {key!r} given twice (--hp {key}=...)")
        value: object = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def serve_hint(run_dir: Path, source_dir: Path) -> str:
    """The command that serves what the script saved, with its inference.py when it has one."""
    import os
    import shlex

    def short(p: Path) -> str:
        rel = os.path.relpath(p)
        return rel if not rel.startswith("..") else str(p)

    handler = source_dir / "inference.py"
    handler_arg = short(handler) if handler.is_file() else "inference.py"
    return (
        f"visiontune serve {shlex.quote(short(run_dir / 'model'))} "
        f"--handler {shlex.quote(handler_arg)}"
    )


@app.command("run", help=_RUN_HELP)
def run(
    script: str = typer.Argument(None, help="The training script (entry_point)."),
    extra_args: list[str] = typer.Argument(None, help="Arguments after -- go to the script."),
    job_config: Path = typer.Option(
        None,
        "--job-config",
        "--config",
        help="YAML of the notebook's estimator/inputs (see docs/script-mode.md); flags win.",
    ),
    source_dir: Path = typer.Option(
        None, "--source-dir", help="Folder the script runs from (default: the script's)."
    ),
    hyperparameters: list[str] = typer.Option(
        None, "--hyperparameters", "--hp", help="NAME=VALUE, repeatable: passed as --NAME VALUE."
    ),
    channel: list[str] = typer.Option(
        None,
        "--channel",
        help="NAME=FOLDER or NAME=s3://PREFIX, repeatable (a bare path is 'training').",
    ),
    metric: list[str] = typer.Option(
        None, "--metric", help="NAME=REGEX, repeatable: the first group is the value."
    ),
    metric_definitions: list[str] = typer.Option(
        None,
        "--metric-definitions",
        help="YAML/JSON file: the estimator's [{Name: ..., Regex: ...}] list.",
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Run directory (default runs/JOB_NAME)."
    ),
    python: str = typer.Option(None, "--python", help="Interpreter (default: visiontune's)."),
    max_run: float = typer.Option(
        None, "--max-run", help="Seconds before the script is stopped (SageMaker's max_run)."
    ),
    stop_grace: float = typer.Option(
        30.0, "--stop-grace", help="Seconds between SIGTERM and SIGKILL when stopping."
    ),
    job_name: str = typer.Option(None, "--job-name", help="Default: script name + timestamp."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint for s3:// channels."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not echo the script's output."),
    profile: bool = typer.Option(
        False, "--profile", help="Sample CPU, memory, GPU and the script's processes (RUN/profile)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    import json
    from dataclasses import asdict

    from visiontune.script.job import run_job

    job, _ = _job_from_options(
        script,
        job_config,
        source_dir=source_dir,
        hyperparameters=hyperparameters,
        channel=channel,
        metric=metric,
        metric_definitions=metric_definitions,
        output=output,
        max_run=max_run,
        endpoint_url=endpoint_url,
        extra_args=extra_args,
    )
    if job_name:
        job.job_name = job_name
        job.output = output or Path("runs") / job_name
    job.python, job.stop_grace, job.echo, job.profile = python, stop_grace, not quiet, profile
    result = run_job(job)
    if json_out:
        typer.echo(json.dumps(asdict(result), indent=2))
    else:
        err = result.status != "Completed"
        typer.echo(f"\n{result.job_name}: {result.status} in {result.duration_s:.1f} s", err=err)
        if result.failure_reason:
            typer.echo(f"reason: {result.failure_reason}", err=True)
        for key, value in result.final_metrics.items():
            typer.echo(f"  {key} = {value:g}  (last of {len(result.metric_series[key])})")
        typer.echo(f"run directory: {result.run_dir}")
        if result.model_archive:
            typer.echo(f"serve it: {serve_hint(Path(result.run_dir), Path(job_source(result)))}")
    code = result.cli_exit_code()
    if code:
        raise typer.Exit(code)


def job_source(result) -> str:
    """The source dir recorded in the run's job.json."""
    from visiontune.script.job import read_job

    return read_job(result.run_dir)["source_dir"]


def _job_from_options(
    script: str | None,
    job_config: Path | None,
    *,
    source_dir: Path | None,
    hyperparameters: list[str] | None,
    channel: list[str] | None,
    metric: list[str] | None,
    metric_definitions: list[str] | None,
    output: Path | None,
    max_run: float | None,
    endpoint_url: str | None,
    extra_args: list[str] | None = None,
):
    """A :class:`ScriptJob` from the notebook YAML (if any) overridden by the flags, and the
    notebook config itself (``None`` without one)."""
    from visiontune.errors import UserError
    from visiontune.script.channels import parse_channel_options
    from visiontune.script.config import load_notebook_config
    from visiontune.script.job import ScriptJob, check_output, checked_max_run, default_job_name
    from visiontune.script.metrics import parse_metric_options

    if output is not None:
        check_output(output)
    nb = load_notebook_config(job_config) if job_config else None
    entry = script or (nb.entry_point if nb else None)
    if not entry:
        raise UserError("say which script to run: SCRIPT, --entry-point or --job-config FILE")
    defs = list(nb.metric_definitions) if nb else []
    flag_defs = parse_metric_options(metric or [], metric_definitions or [])
    flag_names = {d.name for d in flag_defs}
    defs = [d for d in defs if d.name not in flag_names] + flag_defs
    base_name = nb.base_job_name if nb and nb.base_job_name else entry
    name = default_job_name(base_name if base_name.endswith(".py") else base_name + ".py")
    job = ScriptJob(
        entry_point=entry,
        output=output or Path("runs") / name,
        source_dir=source_dir or (nb.source_dir if nb else None),
        hyperparameters={
            **(nb.hyperparameters if nb else {}),
            **parse_hyperparameter_options(hyperparameters or []),
        },
        channels={**(nb.inputs if nb else {}), **parse_channel_options(channel or [])},
        metric_definitions=defs,
        extra_args=list(extra_args or []),
        max_run=checked_max_run(max_run if max_run is not None else (nb.max_run if nb else None)),
        endpoint_url=endpoint_url,
        job_name=name,
    )
    return job, nb


def tune_script_command(**o) -> None:
    """``visiontune tune --entry-point SCRIPT ...`` (or ``--job-config FILE``): called by the
    ``tune`` command with all of its options."""
    import json

    from visiontune.cli.tune_shared import echo_counts_and_best, tune_settings
    from visiontune.errors import UserError
    from visiontune.script.config import load_ranges
    from visiontune.script.tune import tune_script

    job, nb = _job_from_options(
        o["entry_point"],
        o["job_config"],
        source_dir=o["source_dir"],
        hyperparameters=o["hyperparameters"],
        channel=o["channel"] or ([f"training={o['data']}"] if o["data"] else None),
        metric=o["metric"],
        metric_definitions=o["metric_definitions"],
        output=None,
        max_run=o["max_run"],
        endpoint_url=o["endpoint_url"],
    )
    space = load_ranges(o["space"]) if o["space"] else (nb.ranges if nb else None)
    if space is None:
        raise UserError("say what to tune: --space SPACE.yaml or tuner.hyperparameter_ranges")
    objective = o["objective_metric"] or (nb.objective_metric_name if nb else None)
    if not objective:
        raise UserError("say what to optimise: --objective-metric NAME (a --metric name)")
    direction = (o["objective_type"] or (nb.objective_type if nb else "")).lower()
    if direction not in ("minimize", "maximize"):
        raise UserError("--objective-type must be minimize or maximize")
    ctx = o["ctx"]

    def given(name: str) -> bool:
        # A flag typed on the command line wins over the notebook's tuner values.
        source = ctx.get_parameter_source(name)
        return source is not None and source.name != "DEFAULT"

    def pick(flag: str, notebook_value):
        return o[flag] if given(flag) or not nb or notebook_value is None else notebook_value

    max_trials = pick("max_trials", nb.max_jobs if nb else None)
    parallel = pick("parallel", nb.max_parallel_jobs if nb else None)
    strategy = pick("strategy", nb.strategy if nb else None)
    early = pick("early_stopping", nb.early_stopping if nb else None)
    settings = tune_settings(
        study=o["study"],
        study_dir=str(o["study_dir"]) if o["study_dir"] else None,
        storage=o["storage"],
        objective=objective,
        direction=direction,
        max_trials=max_trials,
        parallel=parallel,
        strategy=strategy,
        early_stopping=early,
        timeout=o["timeout"],
        max_retry=o["max_retry"],
        heartbeat=o["heartbeat"],
        seed=o["seed"],
        train_best=o["train_best"],
        warm_start=list(o["warm_start"] or []),
        keep_checkpoints=o["keep_checkpoints"],
    )
    result = tune_script(
        settings, job, space, objective_value=o["objective_value"], echo=not o["json_out"]
    )
    summary = {
        "study": result.study,
        "study_dir": str(result.study_dir),
        "trials": result.counts,
        "best": result.best,
        "report": str(result.report) if result.report else None,
        "best_run": str(result.best_run) if result.best_run else None,
    }
    if o["json_out"]:
        typer.echo(json.dumps(summary, indent=2))
        return
    echo_counts_and_best(result)
    if result.report:
        typer.echo(f"report: {result.report}")
    if result.best_run:
        source = Path(json.loads((result.best_run / "job.json").read_text())["source_dir"])
        typer.echo(f"final model trained in {result.best_run}")
        typer.echo(f"serve it: {serve_hint(result.best_run, source)}")
