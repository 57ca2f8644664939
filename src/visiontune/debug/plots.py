"""Curves of a debugged run: loss and accuracy per step and epoch, and chosen reductions.

:func:`figures` is what the run report embeds; :func:`write_html` writes the same figures as
one self-contained page (plotly's JavaScript inlined once: it opens without network).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

# The reductions a curve can plot (every saved row has them; see Tensor.reduction_value).
REDUCTIONS = ("min", "max", "mean", "std", "variance", "l1", "l2", "zero_frac", "nan", "inf")


def figures(
    run_dir: str | Path,
    regex: str | None = None,
    reduction: str = "mean",
    endpoint_url: str | None = None,
) -> list[Any]:
    """Plotly figures of what ``run_dir``'s debugger captured.

    Args:
        run_dir: the run directory (local or ``s3://``).
        regex: also plot ``reduction`` of the tensors whose names match (search).
        reduction: min, max, mean, std, l1, l2, zero_frac, variance.
        endpoint_url: S3-compatible endpoint.

    Returns:
        ``[]`` when the run has no debugger data.

    Raises:
        UserError: an unknown reduction (each tensor's curve was skipped, so the page came
            without the plot it was asked for), or a bad regex.
    """
    import plotly.graph_objects as go

    from visiontune.debug.trial import TensorUnavailable, Trial
    from visiontune.errors import UserError

    if reduction.lower() not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduction!r} (one of: {', '.join(REDUCTIONS)})")
    try:
        trial = Trial(run_dir, endpoint_url)
    except UserError:
        return []
    figs = []

    loss = go.Figure()
    for name, mode, label in (
        ("loss", "TRAIN", "train loss per saved step"),
        ("metrics/loss", "TRAIN", "train loss per epoch"),
        ("metrics/loss", "EVAL", "valid loss per epoch"),
    ):
        _trace(loss, trial, name, mode, label, "mean", go)
    if loss.data:
        loss.update_layout(title="Loss", xaxis_title="step", yaxis_title="loss")
        figs.append(loss)
    acc = go.Figure()
    for mode, label in (("TRAIN", "train accuracy per epoch"), ("EVAL", "valid accuracy")):
        _trace(acc, trial, "metrics/accuracy", mode, label, "mean", go)
    if acc.data:
        acc.update_layout(title="Accuracy", xaxis_title="step", yaxis_title="accuracy")
        figs.append(acc)
    if regex:
        red = go.Figure()
        for name in trial.tensor_names(regex=regex)[:50]:
            t = trial.tensor(name)
            for mode in sorted({m for m, _ in t._rows}):
                try:
                    _trace(red, trial, name, mode, f"{name} ({mode})", reduction, go)
                except (TensorUnavailable, UserError):
                    continue
        if red.data:
            red.update_layout(
                title=f"{reduction} of tensors matching {regex!r}",
                xaxis_title="step",
                yaxis_title=reduction,
            )
            figs.append(red)
    return figs


def _trace(fig: Any, trial: Any, name: str, mode: str, label: str, reduction: str, go) -> None:
    if not trial.has_tensor(name):
        return
    t = trial.tensor(name)
    steps = t.steps(mode)
    if not steps:
        return
    ys = [t.reduction_value(s, reduction, mode=mode) for s in steps]
    fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines+markers", name=label))


def write_html(
    run_dir: str | Path,
    out: str | Path,
    regex: str | None = None,
    reduction: str = "mean",
    endpoint_url: str | None = None,
) -> Path:
    """Write the figures as one self-contained HTML page; return its path.

    Raises:
        UserError: the run has nothing to plot.
    """
    import plotly.io as pio

    from visiontune.errors import UserError
    from visiontune.io import atomic_write_text, check_page_output

    check_page_output(out)
    figs = figures(run_dir, regex, reduction, endpoint_url)
    if not figs:
        raise UserError(f"nothing to plot in {run_dir}: no debugger data")
    parts = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    title = html.escape(f"visiontune debug: {run_dir}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1>{''.join(parts)}</body></html>"
    )
    if re.search(r"<script[^>]+src=['\"]https?://", page):
        raise RuntimeError("plot page would load a script from the network")
    out = Path(out)
    atomic_write_text(out, page)
    return out
