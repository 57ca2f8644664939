"""The untuned default as a study's first trial, and the rule that keeps it.

On a small data set the objective is noisy: the best of twenty trials is mostly the luckiest,
and a study that simply trains the top trial can come out worse than ``visiontune train``
with no options at all. So a new study's first trial is the untuned default (the fixed
options' own values of every tuned parameter), marked :data:`BASELINE`, and the trial a study
*chooses* (``tune best``, ``--train-best``, the report) is the top trial only when it beats
the default by more than the noise of that comparison:

* cross-validated trials are paired fold by fold (every trial uses the same folds): the top
  trial must gain more than :data:`FOLD_Z` standard errors of its per-fold gains over the
  default; twice, not once, since it is the maximum of many noisy trials;
* plain validation on an accuracy objective: more than one standard error of the difference
  of two accuracies measured on the validation images (binomial);
* a loss objective on plain validation has no noise estimate: the top trial is chosen.

Nothing is hidden: :func:`choose` returns the line that says which trial was chosen and why.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from visiontune.tuning._base import ATTR, BASELINE, CV_VALUES, WARM_START

# Standard errors of the paired fold gain a trial needs to replace the untuned default.
FOLD_Z = 2.0
ACCURACY_OBJECTIVES = ("valid_accuracy", "valid_top5")


def _default_of(fixed, name: str) -> Any:
    """The fixed config's value of a (possibly dotted) parameter name, or ``None``."""
    value = fixed
    for part in name.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def baseline_params(fixed, space) -> tuple[dict[str, Any] | None, str]:
    """The untuned default as a point of ``space``: ``(params, "")``, or ``(None, why not)``
    when a default lies outside the space (then no trial is the default)."""
    params: dict[str, Any] = {}
    for name, dist in space.distributions().items():
        value = _default_of(fixed, name)
        try:
            inside = value is not None and dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if not inside:
            return None, f"the default {name}={value} lies outside the space"
        params[name] = value
    return params, ""


def untuned_default(given, space, n_train: int, classes: int) -> dict[str, Any]:
    """What the study stores about its baseline: ``{"params": ...}`` (the values ``visiontune
    train`` would use for the tuned parameters, small-data defaults included, since the space
    leaves the fixed options' own values of them unset), or ``{"why": ...}`` when a default
    lies outside the space.

    Args:
        given: the fixed options as the user gave them (before the small-data changes).
        space: the study's space.
        n_train: training images (what the small-data defaults depend on).
        classes: number of classes.
    """
    from visiontune import smalldata

    untuned, _ = smalldata.apply(given, n_train, classes, tuned=())
    params, why = baseline_params(untuned, space)
    return {"params": params} if params is not None else {"why": why}


def enqueue_baseline(study, stored: dict[str, Any] | None, strategy: str) -> dict[str, Any]:
    """Make a new study's first trial the untuned default (``stored`` by
    :func:`untuned_default`).

    Returns:
        ``stored`` when enqueued or when it says why not; ``{}`` for a study that already has
        trials, a grid (which runs its own points) or a study from before baselines.
    """
    if not stored or strategy == "grid" or study.get_trials(deepcopy=False):
        return {}
    if stored.get("params") is not None:
        study.enqueue_trial(stored["params"], user_attrs={BASELINE: True}, skip_if_exists=True)
    return stored


def _done(study) -> list:
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE"
        and WARM_START not in t.user_attrs
        and t.value is not None
        and math.isfinite(t.value)
    ]


def _gain_noise(top, base, objective: str, valid_images: int | None) -> float | None:
    """The standard error of ``top``'s gain over ``base`` (``None``: unknown), times the
    margin the rule asks for."""
    a, b = top.user_attrs.get(CV_VALUES), base.user_attrs.get(CV_VALUES)
    if a and b and len(a) == len(b) and len(a) > 1:
        gains = [x - y for x, y in zip(a, b, strict=True)]
        return FOLD_Z * statistics.stdev(gains) / math.sqrt(len(gains))
    if objective in ACCURACY_OBJECTIVES and valid_images:
        p, q = top.value, base.value
        return math.sqrt((p * (1 - p) + q * (1 - q)) / valid_images)
    return None


def _top(done: list, minimize: bool):
    if not done:
        return None
    return (min if minimize else max)(done, key=lambda t: (t.value, t.number))


def top(study):
    """The complete trial with the best objective value, or ``None``. Of equal values the
    later trial is the top when maximising, the earlier when minimising."""
    return _top(_done(study), study.direction.name == "MINIMIZE")


def choose(study) -> tuple[Any, str | None]:
    """The trial a study chooses and, where the default was weighed against the top trial,
    the line that says how (``(None, None)`` with no complete trial)."""
    done = _done(study)
    minimize = study.direction.name == "MINIMIZE"
    best = _top(done, minimize)
    if best is None:
        return None, None
    bases = [t for t in done if t.user_attrs.get(BASELINE)]
    if not bases or best.user_attrs.get(BASELINE):
        note = f"the untuned default (trial {best.number}) is the best trial" if bases else None
        return best, note
    base = bases[0]
    stored = study.user_attrs.get(ATTR, {})
    noise = _gain_noise(best, base, stored.get("objective", ""), stored.get("valid_images"))
    if noise is None:
        return best, None
    gain = (base.value - best.value) if minimize else (best.value - base.value)
    if gain <= 0:  # a tie at the top (maximising, the later trial is top): the default stands
        return base, f"trial {best.number} ties the untuned default (trial {base.number}): " + (
            "the default is kept"
        )
    said = f"trial {best.number} beats the untuned default (trial {base.number}) by {gain:.3g}"
    if gain > noise:
        return best, f"{said}, more than its noise {noise:.2g}: trial {best.number} is chosen"
    return base, f"{said}, within its noise {noise:.2g}: the default is kept"
