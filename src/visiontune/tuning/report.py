"""The tuning report: one self-contained HTML file.

Optimisation history, parallel coordinates and parameter importance come from
``optuna.visualization`` (plotly); plotly.js is inlined once, so the file opens offline and
fetches nothing. Below the plots, the trial table.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path
from typing import Any

from visiontune.io import atomic_write_text, check_page_output
from visiontune.tuning.storage import study_config
from visiontune.tuning.trials import (
    best_summary,
    fmt_params,
    trial_cells,
    trial_counts,
    trial_rows,
)


def _figures(study) -> list[tuple[str, Any]]:
    """The plots that make sense for this study (importance needs two finished trials)."""
    import optuna.visualization as vis
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figs: list[tuple[str, Any]] = []
    if not complete:
        return figs
    figs.append(("Optimisation history", vis.plot_optimization_history(study)))
    figs.append(("Parallel coordinates", vis.plot_parallel_coordinate(study)))
    varied = [
        name
        for name in {k for t in complete for k in t.params}
        if len({repr(t.params.get(name)) for t in complete}) > 1
    ]
    if len(complete) >= 2 and varied:
        try:
            figs.append(("Parameter importance", vis.plot_param_importances(study)))
        except (RuntimeError, ValueError) as e:  # too few distinct trials for the evaluator
            figs.append((f"Parameter importance (not available: {e})", None))
    return figs


def render_report(study) -> str:
    """The report as one HTML string with plotly.js inline."""
    cfg = study_config(study)
    best = best_summary(study)
    counts = trial_counts(study)
    parts = []
    first = True
    for title, fig in _figures(study):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if fig is not None:
            fig.update_layout(template="plotly_white", height=420)
            # Inline plotly.js once (first figure); the rest reuse it. No CDN, no MathJax.
            parts.append(
                fig.to_html(
                    full_html=False,
                    include_plotlyjs=first,
                    include_mathjax=False,
                    config={"displaylogo": False},
                )
            )
            first = False
    if not parts:
        parts.append("<p>No complete trial yet: nothing to plot.</p>")
    rows = []
    for r in trial_rows(study):
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in trial_cells(r)) + "</tr>"
        )
    best_html = (
        "<p>No complete trial yet.</p>"
        if best is None
        else (
            f"<p><b>Best trial {best['trial']}</b>: {html.escape(cfg['objective'])} = "
            f"{best['value']:.6g} with "
            f"<code>{html.escape(fmt_params(best['params']))}</code>"
            f"<br>model: <code>{html.escape(str(best['model_dir']))}</code>"
            + (f"<br>{html.escape(best['selection'])}" if best.get("selection") else "")
            + "</p>"
        )
    )
    counts_txt = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
    cv_html = ""
    if cfg.get("cv_note"):
        folds = (
            f"Each trial's objective is the mean over {cfg['cv']} folds of train+valid; the "
            "objective column shows the folds' standard deviation. "
            if cfg.get("cv")
            else ""
        )
        cv_html = f"{html.escape(folds + cfg['cv_note'])}.<br>"
    space_txt = html.escape(", ".join(f"{k}: {v}" for k, v in cfg["space"].items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>visiontune tuning report: {html.escape(study.study_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
th {{ background: #f4f4f4; }} code {{ background: #f4f4f4; padding: 1px 4px; }}
</style></head><body>
<h1>Tuning report: {html.escape(study.study_name)}</h1>
<p>{html.escape(cfg["strategy"])} search, {html.escape(cfg["direction"])}
{html.escape(cfg["objective"])}, early stopping {html.escape(cfg["early_stopping"])};
budget {cfg["max_trials"]} trials; trials: {html.escape(counts_txt)}.<br>
Space: {space_txt}<br>{cv_html}Generated {dt.datetime.now().isoformat(timespec="seconds")}.</p>
{best_html}
{"".join(parts)}
<h2>Trials</h2>
<table><tr><th>#</th><th>state</th><th>params</th><th>objective</th><th>epochs</th>
<th>duration</th><th>pruned at</th><th>reason</th></tr>
{"".join(rows)}
</table></body></html>
"""


def write_report(study, path: str | Path) -> Path:
    """Write the report atomically and return its path.

    Raises:
        UserError: ``path`` is a directory, or a file that is not an earlier visiontune page.
    """
    path = Path(path)
    check_page_output(path)
    atomic_write_text(path, render_report(study))
    return path
