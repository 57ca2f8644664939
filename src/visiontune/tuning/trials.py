"""Trial bookkeeping: what counts against the budget, the best trial, and the rows and cells that
``tune status``, ``tune best`` and the HTML report all show."""

from __future__ import annotations

from typing import Any

from visiontune.tuning import baseline
from visiontune.tuning._base import (
    BASELINE,
    COUNTED,
    CV_STD,
    CV_VALUES,
    DURATION_S,
    EPOCHS_RUN,
    FAIL_REASON,
    HOST,
    MODEL_DIR,
    PRUNED_AT_EPOCH,
    RUN_DIR,
    WARM_START,
)
from visiontune.tuning.storage import study_config


def state_of(t) -> str:
    """The trial's state name (``COMPLETE``, ``RUNNING``, ...)."""
    return t.state.name


def counted_trials(study) -> list:
    """Finished trials that use up the budget (warm-start seeds do not)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if state_of(t) in COUNTED and WARM_START not in t.user_attrs
    ]


def trial_counts(study) -> dict[str, int]:
    """How many trials are in each state (warm-start seeds as ``WARM_START``)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = "WARM_START" if WARM_START in t.user_attrs else state_of(t)
        counts[key] = counts.get(key, 0) + 1
    return counts


def best_trial(study):
    """The trial the study chooses (not a warm-start seed), or ``None``: the top trial, or the
    untuned default when the top one does not beat it beyond noise (``tuning.baseline``)."""
    return baseline.choose(study)[0]


def top_trial(study):
    """The complete trial with the best objective value (no noise rule), or ``None``."""
    return baseline.top(study)


def best_summary(study) -> dict[str, Any] | None:
    """The best trial as plain data: parameters, objective value, and where its model is."""
    t, note = baseline.choose(study)
    if t is None:
        return None
    cfg = study_config(study)
    return {
        "study": study.study_name,
        "trial": t.number,
        "objective": cfg["objective"],
        "direction": study.direction.name.lower(),
        "value": t.value,
        "params": dict(t.params),
        "baseline": bool(t.user_attrs.get(BASELINE)),
        "selection": note,
        "epochs_run": t.user_attrs.get(EPOCHS_RUN),
        "run_dir": t.user_attrs.get(RUN_DIR),
        "model_dir": t.user_attrs.get(MODEL_DIR),
        "host": t.user_attrs.get(HOST),
    }


def trial_rows(study) -> list[dict[str, Any]]:
    """One plain dict per trial: what ``tune status`` and the report show."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.user_attrs.get(DURATION_S)
        if duration is None and t.datetime_start and t.datetime_complete:
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
        state = "WARM_START" if WARM_START in t.user_attrs else state_of(t)
        rows.append(
            {
                "number": t.number,
                "state": state,
                "params": dict(t.params),
                "value": t.value,
                "epochs_run": t.user_attrs.get(EPOCHS_RUN, len(t.intermediate_values) or None),
                "duration_s": duration,
                "pruned_at_epoch": t.user_attrs.get(PRUNED_AT_EPOCH),
                "fail_reason": t.user_attrs.get(FAIL_REASON),
                "retry_of": t.system_attrs.get("failed_trial"),
                "host": t.user_attrs.get(HOST),
                "run_dir": t.user_attrs.get(RUN_DIR),
                # a cross-validated trial: each fold's value and their spread
                "cv_values": t.user_attrs.get(CV_VALUES),
                "cv_std": t.user_attrs.get(CV_STD),
                "baseline": bool(t.user_attrs.get(BASELINE)),
            }
        )
    return rows


# The header of the table that trial_cells fills (the objective's column is named by the caller).
CELL_HEADERS = ("#", "state", "params", "objective", "epochs", "duration", "pruned at", "note")


def trial_cells(r: dict[str, Any]) -> list[str]:
    """One trial row as the text cells of the status table and the HTML report: number,
    state, params, objective, epochs, duration, pruned at, note."""
    note = r["fail_reason"] or (f"retry of {r['retry_of']}" if r["retry_of"] is not None else "")
    if r.get("baseline"):
        note = f"untuned default{'; ' + note if note else ''}"
    return [
        str(r["number"]),
        r["state"].lower(),
        fmt_params(r["params"]),
        fmt_objective(r),
        fmt_value(r["epochs_run"]),
        "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s",
        fmt_value(r["pruned_at_epoch"]),
        note,
    ]


def fmt_objective(r: dict[str, Any]) -> str:
    """The objective cell: the value, and for a cross-validated trial the folds' spread
    (``0.4321 ± 0.05 over 5 folds``)."""
    value = fmt_value(r["value"])
    if r.get("cv_std") is None or r["value"] is None:
        return value
    return f"{value} ± {r['cv_std']:.2g} over {len(r.get('cv_values') or [])} folds"


def fmt_value(v: Any) -> str:
    """A cell value: ``-`` for none, 4 significant digits for a float."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_params(params: dict[str, Any]) -> str:
    """``k=v k=v`` with floats to 4 significant digits."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())
