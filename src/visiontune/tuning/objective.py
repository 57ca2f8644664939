"""The objective: one trial is one ``train`` run with an epoch-end report callback.

The trial's value is its best epoch's objective, and that epoch's weights are its model. The
report callback reports the objective after every epoch and, when the pruner says so, sets
``state.stop_reason`` (callbacks cannot raise into the training loop).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from visiontune.callbacks import Callback
from visiontune.errors import UserError
from visiontune.tuning._base import (
    BEST_EPOCH,
    COUNTED,
    CV_BEST_EPOCHS,
    CV_MEAN,
    DURATION_S,
    EPOCHS_RUN,
    FAIL_REASON,
    HOST,
    KEEP_CHOICES,
    MODEL_DIR,
    PID,
    PRUNED_AT_EPOCH,
    RUN_DIR,
    TRIAL_NPROC,
    USED_FEATURE_CACHE,
    WORKER,
    TrialFailed,
)
from visiontune.tuning.space import parse_space


def trial_run_dir(study_dir: Path, number: int) -> Path:
    """Where trial ``number`` trains: ``STUDY_DIR/trials/0007``."""
    return (study_dir / "trials" / f"{number:04d}").resolve()


class Objective:
    """One trial = one training run with an epoch-end report hook."""

    def __init__(self, cfg: dict[str, Any], study_dir: Path) -> None:
        self.cfg = cfg
        self.space = parse_space(cfg["space"])
        self.study_dir = study_dir
        self.prune = cfg["strategy"] == "hyperband" or cfg["early_stopping"] == "auto"
        self.cv = int(cfg.get("cv") or 0)  # folds per trial; 0: plain validation

    def __call__(self, trial) -> float:
        import optuna

        from visiontune.config import TrainConfig, build_config
        from visiontune.train import train

        # The worker drew the configuration when it claimed the trial; this reads it back.
        params = self.space.suggest(trial)
        objective = self.cfg["objective"]
        mode = "min" if self.cfg["direction"] == "minimize" else "max"
        run_dir = trial_run_dir(self.study_dir, trial.number)
        trial.set_user_attr(RUN_DIR, str(run_dir))
        trial.set_user_attr(HOST, socket.gethostname())
        trial.set_user_attr(PID, os.getpid())
        if self.cv:
            return self._run_folds(trial, params, run_dir)
        cfg = build_config(
            TrainConfig,
            None,
            {
                **self.cfg["fixed"],
                **params,
                "output": str(run_dir),
                "monitor": objective,  # the best epoch of a trial is its best objective
                "monitor_mode": mode,
                "progress": False,
                "report": False,  # the study's report covers its trials; 3 MB each adds up
            },
        )
        reporter = _Reporter(trial, objective, self.prune)
        t0 = time.perf_counter()
        nproc = int(self.cfg.get(TRIAL_NPROC) or 1)
        try:
            if nproc > 1:  # the trial is a torchrun job of its own (tuning/distributed.py)
                from visiontune.tuning.distributed import train_on_torchrun

                result = train_on_torchrun(
                    cfg, trial, reporter, nproc, worker=self.cfg.get(WORKER), prune=self.prune
                )
            else:
                result = train(cfg, [reporter])
        except (RuntimeError, MemoryError, UserError) as e:
            failure = _record_failure(trial, e)
            if failure is None:
                raise
            raise failure from e
        duration = time.perf_counter() - t0
        trial.set_user_attr(EPOCHS_RUN, len(result.history))
        trial.set_user_attr(DURATION_S, round(duration, 3))
        trial.set_user_attr(USED_FEATURE_CACHE, bool(result.used_feature_cache))
        trial.set_user_attr(MODEL_DIR, str(result.model_dir) if result.model_dir else None)
        trial.set_user_attr(BEST_EPOCH, result.best_epoch)
        if result.best_metrics:
            for key in ("valid_loss", "valid_accuracy"):
                if key in result.best_metrics:
                    trial.set_user_attr(key, float(result.best_metrics[key]))
        if result.stop_reason == "pruned":
            trial.set_user_attr(PRUNED_AT_EPOCH, reporter.pruned_at)
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        value = result.best_metrics.get(objective) if result.best_metrics else None
        if value is None or not math.isfinite(float(value)):
            trial.set_user_attr(FAIL_REASON, f"objective {objective} is {value} (diverged?)")
            raise TrialFailed(f"objective {objective} is {value}")
        return float(value)

    def _run_folds(self, trial, params: dict[str, Any], run_dir: Path) -> float:
        """A cross-validated trial: one training run per fold (``run_dir/fold-i``), each on the
        other folds of train+valid; the objective is the mean of the folds' values.

        A fold's value is its last epoch's objective, not its best epoch's: the final model is
        refit on train+valid for the trial's epoch count (nothing is held out to pick an epoch
        by), so the folds measure exactly that. No pruning: a trial's folds run to the end
        (each is a cheap run on cached features, and a part-mean of folds is no fair ranking).
        """
        from visiontune.config import TrainConfig, build_config
        from visiontune.train import train
        from visiontune.tuning.cv import fold_summary

        objective = self.cfg["objective"]
        values, best_epochs, epochs_run, first_model = [], [], 0, None
        last: dict[str, list[float]] = {"valid_loss": [], "valid_accuracy": []}
        t0 = time.perf_counter()
        used_cache = True
        for fold in range(self.cv):
            values_for = {
                **self.cfg["fixed"],
                **params,
                "output": str(run_dir / f"fold-{fold}"),
                "cv_folds": self.cv,
                "cv_fold": fold,
                "monitor": objective,
                "monitor_mode": "min" if self.cfg["direction"] == "minimize" else "max",
                "progress": False,
                "report": False,
            }
            try:
                result = train(build_config(TrainConfig, None, values_for))
            except (RuntimeError, MemoryError, UserError) as e:
                failure = _record_failure(trial, e)
                if failure is None:
                    raise
                raise failure from e
            value = result.history[-1].get(objective) if result.history else None
            if value is None or not math.isfinite(float(value)):
                reason = f"objective {objective} is {value} in fold {fold} (diverged?)"
                trial.set_user_attr(FAIL_REASON, reason)
                raise TrialFailed(reason)
            values.append(float(value))
            for key, seen in last.items():
                seen.append(float(result.history[-1][key]))
            best_epochs.append(result.best_epoch)
            epochs_run = max(epochs_run, len(result.history))
            used_cache = used_cache and bool(result.used_feature_cache)
            first_model = first_model or result.model_dir
        summary = fold_summary(values)
        for key, v in summary.items():
            trial.set_user_attr(key, v)
        for key, seen in last.items():  # both metrics, whichever is the objective
            trial.set_user_attr(key, statistics.fmean(seen))
        trial.set_user_attr(CV_BEST_EPOCHS, best_epochs)
        trial.set_user_attr(EPOCHS_RUN, epochs_run)
        trial.set_user_attr(DURATION_S, round(time.perf_counter() - t0, 3))
        trial.set_user_attr(USED_FEATURE_CACHE, used_cache)
        # Fold 0's model stands for the trial; the final model is refit by --train-best.
        trial.set_user_attr(MODEL_DIR, str(first_model) if first_model else None)
        return summary[CV_MEAN]


def _record_failure(trial, e: BaseException) -> TrialFailed | None:
    """A training failure that ends the trial, not the study (recorded on the trial), or
    ``None`` for a bug, which keeps its traceback."""
    if isinstance(e, UserError):
        # A combination only this point of the space hits (checked options pass alone).
        trial.set_user_attr(FAIL_REASON, str(e)[:500])
        return TrialFailed(str(e))
    if isinstance(e, MemoryError) or is_oom(str(e)):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"out of memory: {first}"
        trial.set_user_attr(FAIL_REASON, reason[:500])
        return TrialFailed(reason)
    return None


def is_oom(message: str) -> bool:
    """CUDA says "out of memory"; the CPU allocator says "not enough memory"."""
    m = message.lower()
    return any(s in m for s in ("out of memory", "not enough memory", "can't allocate memory"))


class _Reporter(Callback):
    """Reports the objective after every epoch and stops training when the pruner says so."""

    def __init__(self, trial, objective: str, prune: bool) -> None:
        self.trial, self.objective, self.prune = trial, objective, prune
        self.pruned_at: int | None = None

    def on_epoch_end(self, state, metrics) -> None:
        value = metrics.get(self.objective)
        if value is None or not math.isfinite(float(value)):
            return
        epoch = int(metrics["epoch"])
        self.trial.report(float(value), epoch)
        # A trial at its last epoch has spent its budget: let it complete rather than prune.
        last = epoch >= state.config.epochs
        if self.prune and not last and self.trial.should_prune():
            self.pruned_at = epoch
            state.stop_reason = "pruned"


# What a study's trials run, by the ``kind`` stored in its config (default ``train``): the
# parser of its stored space and the objective class. Named as "module:attribute" and imported
# on use, so tuning never imports the kinds built on top of it (script mode).
KINDS = {
    "train": ("visiontune.tuning.space:parse_space", "visiontune.tuning.objective:Objective"),
    "script": (
        "visiontune.script.config:parse_ranges",
        "visiontune.script.objective:ScriptObjective",
    ),
}


def _load(ref: str):
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def study_kind(cfg: dict[str, Any]):
    """``(parse_space, objective_class)`` for the study config ``cfg``.

    Raises:
        UserError: a kind this version of visiontune does not know.
    """
    kind = cfg.get("kind", "train")
    if kind not in KINDS:
        raise UserError(f"this study runs {kind!r} trials, which this visiontune cannot run")
    space_ref, objective_ref = KINDS[kind]
    return _load(space_ref), _load(objective_ref)


def tidy_trial_dirs(study, study_dir: Path, keep: str) -> list[Path]:
    """Delete what ``keep`` does not keep from the run directories of finished trials.

    ``models`` (the default) keeps the model of every complete (or pruned) trial and drops
    checkpoints, which only a running trial could resume from (a retried trial starts afresh
    in its own directory);
    ``best`` keeps only the best trial's model; ``none`` keeps neither (config and metrics
    stay); ``all`` deletes nothing. Only directories under this machine's ``study_dir`` are
    touched: another machine's trials are its own to tidy.

    Returns:
        The directories deleted.
    """
    from visiontune.tuning.trials import best_trial, state_of, top_trial

    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
    if keep == "all":
        return []
    root = (study_dir / "trials").resolve()
    # The chosen trial, and the top one when the untuned default was kept over it: more
    # trials may yet tip the choice (tuning.baseline).
    best = (
        {t.number for t in (best_trial(study), top_trial(study)) if t} if keep == "best" else set()
    )
    removed = []
    for t in study.get_trials(deepcopy=False):
        run_dir = t.user_attrs.get(RUN_DIR)
        if not run_dir or not t.state.is_finished() or Path(run_dir).parent != root:
            continue
        keep_model = (keep == "models" and state_of(t) in COUNTED) or (t.number in best)
        # A cross-validated trial trained one run per fold, in run_dir/fold-i.
        runs = [Path(run_dir), *sorted(Path(run_dir).glob("fold-*"))]
        doomed = [r / "checkpoints" for r in runs]
        if not keep_model:
            doomed += [r / "model" for r in runs]
        for d in doomed:
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed
