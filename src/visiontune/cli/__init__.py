"""The ``visiontune`` command line: one Typer app.

Each subcommand lives in a small module of this package, only parses its options and calls a
stage function. Heavy libraries (torch, optuna, fastapi) are imported inside the commands so
``visiontune --help`` starts fast. A :class:`~visiontune.errors.UserError` becomes one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from visiontune.errors import UserError

app = typer.Typer(
    name="visiontune",
    help="Fine-tune, tune, debug, profile and serve image classifiers, locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        from visiontune import __version__

        typer.echo(f"visiontune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """visiontune: the SageMaker image-classification workflow on your own machine."""


def _register() -> None:
    # Each module adds its commands to `app`; importing them is cheap (no torch at import time).
    import importlib

    for name in ("data", "train", "tune", "serve", "report"):
        try:
            importlib.import_module(f"visiontune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"visiontune.cli.{name}":
                raise


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        # Without standalone mode click returns (not raises) the code of typer.Exit(n).
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors are user errors too
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("VISIONTUNE_DEBUG") or not isinstance(e, OSError):
            raise
        # Unhandled OS errors (disk full, permission denied) are the user's to fix.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
