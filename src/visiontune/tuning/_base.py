"""Names every tuning module shares: the lowest module of the package, importing none of them.

The study's stored config, the trial attributes that the objective writes and ``status``,
``best`` and the report read, the metrics an objective may name, which way each is optimised,
and where a study lives by default.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

ATTR = "visiontune"  # the study user attribute that holds the study's config
FORMAT = 1

# What a trial can optimise: metrics that training logs every epoch.
METRICS = (
    "valid_loss",
    "valid_accuracy",
    "valid_top5",
    "train_loss",
    "train_accuracy",
    "lr",
    "images_per_sec",
    "epoch_time",
)
COUNTED = ("COMPLETE", "PRUNED")  # trial states that use up the budget

# What finished trials keep on disk (--keep-checkpoints); the first is the default.
KEEP_CHOICES = ("models", "best", "all", "none")

# Trial user attributes (written by the objective and the workers, read by status and report).
RUN_DIR = "run_dir"
MODEL_DIR = "model_dir"
HOST = "host"
PID = "pid"
EPOCHS_RUN = "epochs_run"
DURATION_S = "duration_s"
PRUNED_AT_EPOCH = "pruned_at_epoch"
FAIL_REASON = "fail_reason"
WARM_START = "warm_start"  # set on seeds copied from an earlier study; they use no budget
BASELINE = "baseline"  # set on the trial that is the untuned default (tuning.baseline)
USED_FEATURE_CACHE = "used_feature_cache"
BEST_EPOCH = "best_epoch"
# A cross-validated trial (visiontune.tuning.cv): each fold's objective in fold order, their
# mean (the trial's value), their sample standard deviation (the spread the report shows), and
# each fold's best epoch.
CV_VALUES = "cv_values"
CV_MEAN = "cv_mean"
CV_STD = "cv_std"
CV_BEST_EPOCHS = "cv_best_epochs"

# What a worker adds to the study config it hands its objective (this machine's choices, not
# stored in the study): processes per trial (--trial-nproc) and the worker's --parallel index.
TRIAL_NPROC = "trial_nproc"
WORKER = "worker"

# Where studies live unless --study-dir says otherwise: studies/NAME, relative to the caller.
STUDIES_ROOT = Path("studies")


def default_study_dir(study: str) -> Path:
    """The directory of study ``study`` when no ``--study-dir`` is given.

    Raises:
        UserError: a name that is not one directory name: ``""`` made ``studies/`` itself the
            study's directory, and ``../x`` or ``a/b`` put it outside ``studies/`` or inside
            another study's.
    """
    from visiontune.errors import UserError

    if study.strip() in ("", ".", "..") or "/" in study or "\\" in study:
        raise UserError(
            f"study name {study!r} cannot name its directory under {STUDIES_ROOT}/: use letters, "
            "digits, - or _, or give --study-dir DIR"
        )
    return STUDIES_ROOT / study


def minimizes(metric: str) -> bool:
    """A loss is minimised; every other metric (accuracy, throughput) is maximised."""
    from visiontune.config import is_minimised  # the one rule, shared with train's monitor

    return is_minimised(metric)


def direction_for(objective: str, direction: str) -> str:
    """``minimize`` or ``maximize``: ``direction`` itself, or for ``auto`` what suits the
    metric."""
    if direction != "auto":
        return direction
    return "minimize" if minimizes(objective) else "maximize"


class TrialFailed(Exception):
    """A trial failed for a reason recorded on it (out of memory, a diverged loss); the study
    goes on."""


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna marks heartbeats experimental and warns on every use; the warning tells a user
    nothing they can act on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # Workers claim trials with ask/tell (under a lock) and run the heartbeat themselves.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield
