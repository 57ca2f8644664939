"""``visiontune debug RUN``: what the debugger captured, its rules (re-run), its curves."""

from __future__ import annotations

import json
from typing import Any

import typer

from visiontune.cli import app

_HELP = """Inspect a run's debugger data (local or s3://, finished or in progress).

Without options: re-run the rules over the captured data and print their verdicts.
--tensors REGEX lists matching tensors; --plot writes a self-contained HTML page of curves.
"""


def _rule_specs(rules: str | None, sets: list[str], actions: list[str], trial) -> list[Any]:
    from visiontune.config import _coerce
    from visiontune.debug.config import DEFAULT_RULES, RuleSpec
    from visiontune.errors import UserError

    if rules:
        specs = [RuleSpec(name=n.strip()) for n in rules.split(",") if n.strip()]
    else:
        specs = [RuleSpec(**r) for r in trial.meta.get("rules", [])] or [
            RuleSpec(name=n) for n in DEFAULT_RULES
        ]
    by_name = {s.name: s for s in specs}
    for item in sets:
        key, eq, value = item.partition("=")
        rule, dot, param = key.partition(".")
        if not eq or not dot:
            raise UserError(f"--set {item!r} must look like Rule.param=value")
        if rule not in by_name:
            by_name[rule] = RuleSpec(name=rule)
            specs.append(by_name[rule])
        by_name[rule].parameters[param.strip()] = _coerce(value)
    for item in actions:
        rule, eq, action = item.partition("=")
        if not eq or action not in ("log", "stop") or rule not in by_name:
            raise UserError(f"--action {item!r} must look like Rule=log|stop for a chosen rule")
        by_name[rule].action = action
    return specs


@app.command(help=_HELP)
def debug(
    run: str = typer.Argument(..., help="Run directory (or s3://...)."),
    rules: str = typer.Option(None, "--rules", help="Comma-separated rule names to run."),
    set_: list[str] = typer.Option(None, "--set", help="Rule parameter: Rule.param=VALUE."),
    tensors: str = typer.Option(None, "--tensors", help="List tensors matching this regex."),
    plot: bool = typer.Option(False, "--plot", help="Write an HTML page of the curves."),
    plot_regex: str = typer.Option(None, "--plot-tensors", help="Also plot tensors matching."),
    reduction: str = typer.Option("mean", help="Reduction plotted for --plot-tensors."),
    output: str = typer.Option(None, "--output", "-o", help="Where --plot writes the page."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint URL."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    from pathlib import Path

    from visiontune.debug.trial import Trial, run_rules
    from visiontune.uri import is_remote

    trial = Trial(run, endpoint_url)
    if plot:
        from visiontune.debug.plots import write_html

        if output is None:
            output = str(Path(run) / "debug" / "plots.html") if not is_remote(run) else "debug.html"
        path = write_html(run, output, plot_regex, reduction, endpoint_url)
        if not json_out:
            typer.echo(f"plots written to {path}")
    if tensors is not None:
        _print_tensors(trial, tensors, json_out)
        return
    specs = _rule_specs(rules, set_ or [], [], trial)
    results = run_rules(trial, specs)
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    if plot and not rules and not set_:
        return
    steps = trial.steps()
    typer.echo(
        f"{run}: {len(trial.tensor_names())} tensors, {len(steps)} saved steps"
        + (f" ({steps[0]}..{steps[-1]})" if steps else "")
        + ("" if trial.finished else " (run in progress or stopped)")
    )
    for line in trial.meta.get("not_captured", []):
        typer.echo(f"note: {line}")
    for r in results:
        status = "n/a" if not r.applicable else ("FIRED" if r.triggered else "ok")
        typer.echo(f"{status:>5}  {r.rule}: {r.message}")
        if r.triggered and r.recommendation:
            typer.echo(f"       -> {r.recommendation}")


def _print_tensors(trial, regex: str, json_out: bool) -> None:
    names = trial.tensor_names(regex=regex)
    items = []
    for name in names:
        t = trial.tensor(name)
        steps = t.steps()
        item: dict[str, Any] = {"name": name, "collection": t.collection, "steps": steps}
        if t.absent:
            item["absent"] = t.absent
        elif steps:
            last = steps[-1]
            modes = sorted({m for m, s in t._rows if s == last})
            item["last"] = {"step": last, **t.reduction_values(last, mode=modes[0])}
        items.append(item)
    if json_out:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo(f"no tensor matches {regex!r}")
        return
    for it in items:
        if "absent" in it:
            typer.echo(f"{it['name']}  [{it['collection']}]  absent: {it['absent']}")
            continue
        last = it.get("last", {})
        typer.echo(
            f"{it['name']}  [{it['collection']}]  {len(it['steps'])} steps  "
            f"last step {last.get('step')}: mean {last.get('mean', float('nan')):.4g} "
            f"min {last.get('min', float('nan')):.4g} max {last.get('max', float('nan')):.4g} "
            f"l2 {last.get('l2', float('nan')):.4g}"
        )
