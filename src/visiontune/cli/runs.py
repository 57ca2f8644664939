"""``visiontune runs list`` and ``visiontune runs compare``: runs without a tracking server."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from visiontune.cli import app

runs_app = typer.Typer(
    help="List and compare training runs from their run directories (local or s3://).",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def list_(
    directory: str = typer.Argument(
        "runs", help="A folder (or s3:// prefix) holding run directories, or one run."
    ),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
) -> None:
    """A table of runs: data, model, hyperparameters, best metric, test accuracy, status.

    Status is finished, stopped (ended before its last epoch) or running (no model yet and
    files written in the last 15 minutes, or three epochs when epochs are slower).
    """
    from visiontune.tracking.runs import format_duration, list_runs

    unreadable: list[str] = []
    runs = list_runs(directory, endpoint_url, unreadable)
    for reason in unreadable:
        typer.echo(f"warning: left out: {reason}", err=True)
    if json_out:
        typer.echo(json.dumps([r.to_json() for r in runs], indent=2))
        return
    if not runs:
        typer.echo(f"no runs under {directory}", err=True)
        return
    from rich.table import Table

    from visiontune.cli import output_console

    table = Table(
        "run", "status", "data", "model", "trainable", "hyperparameters", "best", "test acc",
        "train time",
    )  # fmt: skip
    for r in runs:
        best = "" if r.best_value is None else f"{r.monitor} {r.best_value:.4g} @{r.best_epoch}"
        test = "" if r.test_accuracy is None else f"{r.test_accuracy:.4f}"
        if r.test_accuracy is not None and r.test_split != "test":
            test += f" ({r.test_split})"
        table.add_row(
            r.name,
            r.status,
            str(r.data or ""),
            str(r.model or ""),
            str(r.trainable or ""),
            " ".join(f"{k}={v}" for k, v in r.params.items()),
            best,
            test,
            format_duration(r.train_time_s),
        )
    output_console().print(table)


@runs_app.command("compare")
def compare(
    runs: list[str] = typer.Argument(..., help="Two or more run directories (local or s3://)."),
    html: Path = typer.Option(
        Path("runs-compare.html"), "--html", help="Where to write the page of overlaid curves."
    ),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Config differences and metrics side by side, and an HTML page of overlaid curves."""
    from visiontune.tracking.runs import (
        compare_runs,
        config_differences,
        headline_rows,
        write_compare_html,
    )

    summaries = compare_runs(runs, endpoint_url)
    diffs = config_differences(summaries)
    page = write_compare_html(summaries, html)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "runs": [r.to_json(full=True) for r in summaries],
                    "config_differences": diffs,
                    "html": str(page),
                },
                indent=2,
            )
        )
        return
    from rich.table import Table

    from visiontune.cli import output_console

    console = output_console()
    names = [r.name for r in summaries]
    metrics = Table("", *names, title="metrics")
    for label, get in headline_rows():
        metrics.add_row(label, *(str(get(r) if get(r) is not None else "") for r in summaries))
    console.print(metrics)
    if diffs:
        table = Table("config key", *names, title="config differences")
        for key, values in diffs.items():
            table.add_row(key, *(json.dumps(v) for v in values))
        console.print(table)
    else:
        console.print("the configs are the same", highlight=False)
    console.print(f"curves: {page}", highlight=False, markup=False)
