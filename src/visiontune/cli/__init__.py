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


def _hide_flag_types() -> None:
    """Show no ``<bool>`` type beside options that take no value (``--json``, ``--help``).

    typer 0.29 labels every option in the help panel with its Python type, flags included,
    which reads as if ``--json`` took a value; plain click shows nothing for a flag. One
    wrapper here covers every command, including ``--help`` itself and the sub-apps of other
    modules. If typer renames the method, this does nothing and the help test says so.
    """
    from typer import core

    option = getattr(core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_hides_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._hides_flags = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_hide_flag_types()

# Shared by evaluate, predict, transform and serve: the same flags mean the same thing.
TTA_HELP = (
    "Test-time augmentation: average the class probabilities of the image and its mirror "
    "(more views with --tta-views)."
)
TTA_VIEWS_HELP = (
    "Views per image with --tta (implies it): 2 = image + mirror; 4 adds a centre zoom and "
    "its mirror; up to 12 with corner zooms."
)

# Wide enough for any table, so a piped table keeps whole cells instead of "…".
_PIPE_WIDTH = 10_000


def output_console():
    """A Rich console for tables on stdout: the terminal's width, or unbounded when piped.

    Rich falls back to 80 columns when stdout is not a terminal and cuts cells with "…";
    a table sent to a file or ``grep`` must keep every value.
    """
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=_PIPE_WIDTH)
    return console


app = typer.Typer(
    name="visiontune",
    help="Fine-tune, tune, debug, profile and serve image classifiers, locally.",
    no_args_is_help=True,
    add_completion=True,
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

    for name in ("data", "train", "tune", "serve", "debug", "report", "script", "runs"):
        try:
            importlib.import_module(f"visiontune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"visiontune.cli.{name}":
                raise


_register()


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """The ClickException classes in play: typer's bundled click, and click where installed.

    typer >= 0.24 vendors click as ``typer._click`` and raises its exceptions, which are not
    ``click.ClickException``; checking only the latter turned every usage error into a
    traceback. The bundled class is found through the public ``typer.BadParameter``.
    """
    found = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:  # typer no longer needs click itself
        pass
    return tuple(dict.fromkeys(found))


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
        if isinstance(e, _click_exceptions()):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("VISIONTUNE_DEBUG") or not isinstance(e, OSError):
            raise
        # Unhandled OS errors (disk full, permission denied) are the user's to fix.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
