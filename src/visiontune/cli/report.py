"""``visiontune report RUN``: the HTML run report of any run, finished or not, local or s3."""

from __future__ import annotations

from pathlib import Path

import typer

from visiontune.cli import app

# What the report reads; checkpoints and weights stay where they are.
_SKIP_SUFFIXES = (".pt", ".safetensors", ".onnx", ".pth")


@app.command()
def report(
    run: str = typer.Argument(..., help="Run directory, or its s3:// prefix."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Where to write the HTML (default: RUN/report.html; ./NAME-report.html for s3).",
    ),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
) -> None:
    """Write the self-contained HTML report of a training run and print its path."""
    from visiontune.errors import UserError
    from visiontune.report import write_report
    from visiontune.uri import is_remote

    if is_remote(run):
        import tempfile

        name = run.rstrip("/").rsplit("/", 1)[-1] or "run"
        with tempfile.TemporaryDirectory(prefix="visiontune-report-") as tmp:
            local = Path(tmp) / name
            _download_run(run, local, endpoint_url)
            path = write_report(local, output or Path.cwd() / f"{name}-report.html")
    else:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise UserError(f"run directory not found: {run_dir}")
        if not any((run_dir / p).exists() for p in ("config.yaml", "metrics.jsonl", "profile")):
            raise UserError(
                f"{run_dir} is not a training run (no config.yaml, metrics.jsonl or profile/)"
            )
        path = write_report(run_dir, output)
    typer.echo(str(path))


def _download_run(uri: str, dest: Path, endpoint_url: str | None) -> None:
    """Copy the small files of a remote run (not its checkpoints or weights) into ``dest``."""
    import os

    from visiontune.errors import UserError
    from visiontune.uri import open_fs, storage_errors

    with storage_errors(uri, endpoint_url):
        fs, root = open_fs(uri, endpoint_url)
        found = [p for p in fs.find(root) if not p.endswith(_SKIP_SUFFIXES)]
        if not found:
            raise UserError(f"{uri} holds no run files")
        for remote in found:
            target = dest / os.path.relpath(remote, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
