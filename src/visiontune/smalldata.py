"""Defaults for small data sets: what ``train`` and ``tune`` change when a class has few images.

With fewer than :data:`SMALL_PER_CLASS` training images per class, the general defaults (batch
32, 5 epochs, augmentation recomputed through the backbone every epoch, hard labels) waste the
data: an epoch is one or two steps, the head sees each image a handful of times, and a frozen
backbone pays for augmentation it could have cached. Options the user set (on the command line,
in a config file, in a resumed run's config) are never changed; what is changed is said in one
line on stderr and recorded in the run's config, so nothing is hidden.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

# Below this many training images per class (on average) a data set counts as small.
SMALL_PER_CLASS = 20
# Cached augmented views per training image on small data (frozen backbone).
SMALL_VIEWS = 8
SMALL_LABEL_SMOOTHING = 0.1
# Small data sets train for at least this many optimizer steps (cheap on cached features) ...
MIN_STEPS = 150
# ... but never for more epochs than this.
MAX_EPOCHS = 60


def small_data_changes(
    cfg: Any, n_train: int, num_classes: int, tuned: Collection[str] = ()
) -> dict[str, Any]:
    """The config changes small data calls for, among the options ``cfg`` leaves at default.

    Args:
        cfg: a ``TrainConfig``; ``cfg.model_fields_set`` says which options the user set.
        n_train: training images.
        num_classes: classes.
        tuned: options a search space tunes (left alone too).

    Returns:
        ``{option: new value}``; empty when the data set is not small or the user set them all.
    """
    if not cfg.small_data_defaults or num_classes < 1 or n_train / num_classes >= SMALL_PER_CLASS:
        return {}
    chosen = set(cfg.model_fields_set) | set(tuned)
    changes: dict[str, Any] = {}
    if "batch_size" not in chosen and cfg.batch_size > n_train // 2:
        # Several steps an epoch: the largest power of two up to half the training images.
        changes["batch_size"] = max(1, 2 ** int(math.log2(max(1, n_train // 2))))
    cached = cfg.frozen_backbone and cfg.feature_cache
    if cached and cfg.augment != "none" and "augment_views" not in chosen:
        changes["augment_views"] = SMALL_VIEWS
    if "label_smoothing" not in chosen and cfg.label_smoothing == 0:
        changes["label_smoothing"] = SMALL_LABEL_SMOOTHING
    will_cache = cached and (
        cfg.augment == "none" or changes.get("augment_views", cfg.augment_views) > 0
    )
    if will_cache and "epochs" not in chosen:
        batch = changes.get("batch_size", cfg.batch_size)
        steps_per_epoch = math.ceil(n_train / batch)
        epochs = min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))
        if epochs > cfg.epochs:
            changes["epochs"] = epochs
    return changes


def describe(changes: dict[str, Any], n_train: int, num_classes: int) -> str:
    """The one line that says what small data changed."""
    what = ", ".join(f"{k} {v}" for k, v in changes.items())
    return (
        f"small data ({n_train / num_classes:.1f} training images per class): {what} "
        "(set any of them to choose otherwise)"
    )


def apply(
    cfg: Any, n_train: int, num_classes: int, tuned: Collection[str] = ()
) -> tuple[Any, str | None]:
    """``cfg`` with the small-data changes, and the line that says them (``None``: none)."""
    changes = small_data_changes(cfg, n_train, num_classes, tuned)
    if not changes:
        return cfg, None
    return cfg.model_copy(update=changes), describe(changes, n_train, num_classes)


def small_objective(cfg: Any, n_train: int, num_classes: int) -> tuple[str | None, str | None]:
    """A study's objective on small data when the user named none: ``(objective, the line that
    says so)``, or ``(None, None)`` to keep the general default (valid_loss).

    On a few images a class the validation loss ranks heads by confidence more than by what
    they get right: a head trained with little label smoothing or weight decay is sure of the
    images it gets right and wins the loss without classifying better (measured on
    hymenoptera-10: the study's loss-best trial, a nearly unregularised probe, scored 1.3
    points under the default on test). Accuracy is what the model is judged by.
    """
    if not cfg.small_data_defaults or num_classes < 1 or n_train / num_classes >= SMALL_PER_CLASS:
        return None, None
    return "valid_accuracy", (
        "small data: the objective is valid_accuracy (the loss of a few images a class favours "
        "overconfident heads; --objective valid_loss to choose)"
    )


def training_size(cfg: Any) -> tuple[int, int]:
    """``(training images, classes)`` of ``cfg``'s data as a run would split it."""
    from visiontune.data.folder import discover
    from visiontune.data.splits import resolve_splits

    index = discover(
        cfg.data,
        endpoint_url=cfg.endpoint_url,
        split_ratios=cfg.split_ratios,
        split_seed=cfg.split_seed,
        limit_per_class=cfg.limit_per_class,
    )
    n_train = len(resolve_splits(index, cfg.split_seed, announce=False).get("train") or [])
    return n_train, len(index.class_ids)


def small_space(space: Any, fixed: Any, n_train: int, num_classes: int) -> tuple[Any, str | None]:
    """A study's space on small data: the probe head joins it when trials train on cached
    features and neither the space nor the fixed options say which head. Returns the space and
    the line that says so (``None``: unchanged)."""
    from visiontune.tuning.space import parse_space

    names = {p.name for p in space.params}
    if (
        not fixed.small_data_defaults
        or num_classes < 1
        or n_train / num_classes >= SMALL_PER_CLASS
        or "head" in names
        or "head" in fixed.model_fields_set
        or not fixed.uses_feature_cache
    ):
        return space, None
    spec = {**space.to_dict(), "head": {"type": "categorical", "values": ["linear", "probe"]}}
    return parse_space(spec), (
        "small data: the space also tries head [linear, probe] (the probe is an L-BFGS "
        "logistic regression; put head in the space or --set head=... to choose)"
    )
