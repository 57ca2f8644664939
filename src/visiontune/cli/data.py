"""``visiontune data``: check a dataset, fetch a named one, list the names."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from visiontune.cli import app

data_app = typer.Typer(help="Check datasets and fetch named ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def check(
    data: str = typer.Argument(
        ..., help="dataset folder, s3://bucket/prefix, http(s) archive or name"
    ),
    endpoint_url: str | None = typer.Option(
        None, "--endpoint-url", help="S3-compatible endpoint (MinIO...); default from AWS config"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when any problem is found"),
) -> None:
    """Count images per split and class, and list every problem (bad files, duplicates...)."""
    from visiontune.data.check import check_dataset

    report = check_dataset(data, endpoint_url, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    if strict and report.problems:
        # SystemExit, not typer.Exit: with standalone_mode=False click returns typer.Exit's
        # code from app() instead of exiting, and main() drops it.
        raise SystemExit(1)


def _print_report(report) -> None:
    from rich.table import Table

    from visiontune.cli import output_console

    console = output_console()
    splits = list(report.counts)
    table = Table(
        title=f"{report.root}  ({report.total_images} images, {len(report.classes)} classes)"
    )
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for class_id in report.classes:
        table.add_row(class_id, *[str(report.counts[s].get(class_id, "-")) for s in splits])
    table.add_row(
        "[bold]total",
        *[f"[bold]{sum(report.counts[s].values())}" for s in splits],
        end_section=True,
    )
    table.add_row(
        "imbalance (max/min)",
        *[f"{r}" if (r := report.imbalance_ratio.get(s)) is not None else "-" for s in splits],
    )
    console.print(table)
    sizes = report.image_size.get("shorter_side") or {}
    if sizes:
        w, h = report.image_size["width"], report.image_size["height"]
        console.print(
            f"image size: width {w['min']}-{w['max']} (median {w['median']:g}), height "
            f"{h['min']}-{h['max']} (median {h['median']:g}); formats: "
            + ", ".join(f"{k} {v}" for k, v in report.formats.items())
        )
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if not report.problems:
        console.print("[green]no problems found")
        return
    console.print(f"[yellow]{len(report.problems)} problem(s):")
    for p in report.problems:
        console.print(f"  {p.kind}: {p.message}", markup=False, soft_wrap=True)


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="dataset name (see `visiontune data list`)"),
    dest: Path | None = typer.Option(
        None, "--dest", help="folder to create; default $VISIONTUNE_HOME/datasets/NAME"
    ),
    limit_per_class: int | None = typer.Option(
        None, "--limit-per-class", min=1, help="keep at most N images per class in each split"
    ),
) -> None:
    """Download (or build) a named dataset once into the folder layout, verified."""
    from visiontune.data.catalog import fetch as fetch_dataset

    root = fetch_dataset(name, dest, limit_per_class)
    typer.echo(str(root))


@data_app.command("list")
def list_datasets() -> None:
    """List the named datasets."""
    from visiontune.data.catalog import DATASETS

    for spec in DATASETS.values():
        typer.echo(f"{spec.name:15} {spec.description}")
