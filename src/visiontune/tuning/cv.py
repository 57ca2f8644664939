"""Cross-validated objectives: when a study cross-validates, and what its folds say.

A validation split of a few images per class makes a noisy objective: the sampler then chases
noise, and the tuned model can come out worse than the untuned default. On such data a trial
instead trains K times, each on K-1 folds of train+valid pooled, and its objective is the mean
over the folds (the test split is never pooled). The fold assignment itself is split policy and
lives in ``visiontune.data.splits``.

``--cv auto`` (the default) cross-validates when the validation split has fewer than
:data:`AUTO_BELOW_PER_CLASS` images per class on average and the trials train on cached
backbone features (then K folds cost little more than one run); ``--cv K`` always does, with K
folds; ``--cv 0`` never does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from visiontune.tuning._base import CV_MEAN, CV_STD, CV_VALUES

# --cv auto: cross-validate below this many validation images per class (on average)...
AUTO_BELOW_PER_CLASS = 20
# ...with this many folds, or fewer when a class has fewer pooled images.
AUTO_FOLDS = 5


@dataclass(frozen=True)
class CvPlan:
    """What a study does about a noisy objective: ``folds`` (0: plain validation) and the one
    line that says why."""

    folds: int
    line: str
    valid_images: int = 0  # the plain validation split's size (the noise of its accuracy)


def accuracy_se(n: int, accuracy: float = 0.5) -> float:
    """The binomial standard error of an accuracy measured on ``n`` images."""
    return math.sqrt(accuracy * (1 - accuracy) / max(1, n))


def plan_cv(requested: int | str, fixed) -> CvPlan:
    """Decide whether (and with how many folds) a study cross-validates.

    Args:
        requested: ``"auto"``, ``0`` (off) or the number of folds.
        fixed: the study's fixed ``TrainConfig``.

    Raises:
        UserError: K folds asked for, but a class has fewer than K images in train+valid.
    """
    from visiontune.data.folder import discover
    from visiontune.data.splits import cv_pool, fewest_per_class, resolve_splits
    from visiontune.errors import UserError

    index = discover(
        fixed.data,
        endpoint_url=fixed.endpoint_url,
        split_ratios=fixed.split_ratios,
        split_seed=fixed.split_seed,
        limit_per_class=fixed.limit_per_class,
    )
    splits = resolve_splits(index, fixed.split_seed, announce=False)
    n_valid = len(splits.get("valid") or [])
    classes = max(1, len(index.class_ids))
    per_class = n_valid / classes
    pool = cv_pool(splits)
    fewest = fewest_per_class(pool)
    noise = (
        f"valid has {n_valid} images ({per_class:.1f} per class): accuracy SE ~ "
        f"{accuracy_se(n_valid, 0.9):.2f} at 90% accuracy, {accuracy_se(n_valid):.2f} at 50%"
    )
    cv_on = f"using {{k}}-fold CV on {len(pool)} train+valid images instead"
    stops_early = fixed.early_stopping is not None
    if requested == "auto":
        if per_class >= AUTO_BELOW_PER_CLASS:
            return CvPlan(
                0, f"{noise}; plain validation objective (--cv K cross-validates)", n_valid
            )
        if fewest < 2:
            return CvPlan(0, f"{noise}; too few images per class to cross-validate", n_valid)
        if stops_early:
            return CvPlan(
                0,
                f"{noise}; not cross-validating: early_stopping picks each run's epochs, which "
                "a refit on train+valid could not repeat",
                n_valid,
            )
        if not fixed.uses_feature_cache:
            # Trials on images would cost K times as much: that is the user's call.
            return CvPlan(
                0,
                f"{noise}; not cross-validating since trials train on images, not cached "
                f"features, and K folds cost K times as much (--cv {AUTO_FOLDS} does it anyway)",
                n_valid,
            )
        k = min(AUTO_FOLDS, fewest)
        return CvPlan(k, f"{noise}; {cv_on.format(k=k)} (--cv 0 turns it off)", n_valid)
    k = int(requested)
    if k == 0:
        return CvPlan(0, f"{noise}; plain validation objective (--cv 0)", n_valid)
    if k < 2:
        raise UserError(f"--cv must be auto, 0 (off) or a number of folds >= 2, got {k}")
    if stops_early:
        raise UserError(
            f"--cv {k}: the final model is refit on train+valid for a fixed epoch count; "
            "drop early_stopping (tune epochs instead) or use --cv 0"
        )
    if fewest < k:
        raise UserError(
            f"--cv {k} needs at least {k} images of each class in train+valid; "
            f"the smallest class has {fewest}: use fewer folds"
        )
    return CvPlan(k, f"{noise}; {cv_on.format(k=k)} (--cv {k})", n_valid)


def fold_summary(values: list[float]) -> dict[str, Any]:
    """The fold values, their mean (the trial's objective) and their spread."""
    return {
        CV_VALUES: [float(v) for v in values],
        CV_MEAN: statistics.fmean(values),
        CV_STD: statistics.stdev(values) if len(values) > 1 else 0.0,
    }
