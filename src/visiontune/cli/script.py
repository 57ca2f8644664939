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
    script: str = typer.Argument(..., help="The training script (entry_point)."),
    extra_args: list[str] = typer.Argument(None, help="Arguments after -- go to the script."),
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
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    import json
    from dataclasses import asdict

    from visiontune.script.channels import parse_channel_options
    from visiontune.script.job import ScriptJob, default_job_name, run_job
    from visiontune.script.metrics import parse_metric_options

    name = job_name or default_job_name(script)
    job = ScriptJob(
        entry_point=script,
        output=output or Path("runs") / name,
        source_dir=source_dir,
        hyperparameters=parse_hyperparameter_options(hyperparameters or []),
        channels=parse_channel_options(channel or []),
        metric_definitions=parse_metric_options(metric or [], metric_definitions or []),
        extra_args=list(extra_args or []),
        python=python,
        max_run=max_run,
        stop_grace=stop_grace,
        endpoint_url=endpoint_url,
        job_name=name,
        echo=not quiet,
    )
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
