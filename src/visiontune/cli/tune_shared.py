"""What ``visiontune tune`` and its script mode (``--entry-point``) share: their settings, with
a bad value named by its flag, and the summary lines of a finished study."""

from __future__ import annotations

from typing import Any

import typer


def tune_settings(**fields: Any):
    """A ``TuneSettings`` from the command's options.

    Raises:
        UserError: a value pydantic refuses (a bad --strategy or --direction...), in one line
            that names its flag.
    """
    from pydantic import ValidationError

    from visiontune.errors import UserError
    from visiontune.tuning.study import TuneSettings

    try:
        return TuneSettings(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"invalid --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from e


def echo_counts_and_best(result) -> None:
    """The study's trials counted by state, then its best trial's value and parameters."""
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result.counts.items()))
    typer.echo(f"study {result.study}: {counts}")
    if result.best:
        b = result.best
        params = " ".join(f"{k}={v}" for k, v in b["params"].items())
        typer.echo(f"best trial {b['trial']}: {b['objective']}={b['value']:.6g}  {params}")
