"""Hyperparameter tuning: an Optuna study whose every trial is a ``train`` run.

Tuning wraps training. A trial builds a ``TrainConfig`` from the study's fixed options plus the
point the sampler drew, calls :func:`visiontune.train.train` with a callback that reports the
objective every epoch (and asks training to stop when the pruner says so), and returns the best
epoch's objective. Each trial writes its own run directory, ``STUDY_DIR/trials/0007/``.

This module holds the job as a user sees it: the settings, creating (or continuing) a study
after every check, the warm start, :func:`tune` and :func:`train_best`. The parts live in their
own modules, as Optuna splits them: ``storage`` (journal, RDB, heartbeat, the claim lock),
``samplers`` (by name, never a configuration twice), ``objective`` (one trial = one training
run), ``workers`` (the claim loop and local worker processes) and ``trials`` (what status and
the report show). Names they all share live in ``_base``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visiontune.errors import UserError
from visiontune.tuning._base import (
    ATTR,
    FORMAT,
    METRICS,
    WARM_START,
    default_study_dir,
    direction_for,
    quiet_optuna,
)
from visiontune.tuning.baseline import enqueue_baseline, untuned_default
from visiontune.tuning.space import RESERVED, SearchSpace
from visiontune.tuning.storage import (
    default_storage,
    load_study,
    open_storage,
    redact,
    study_config,
)
from visiontune.tuning.trials import (
    best_summary,
    best_trial,
    counted_trials,
    fmt_params,
    trial_counts,
)
from visiontune.tuning.workers import (
    check_distributed_trials,
    run_worker,
    spawn_workers,
    wait_workers,
)

# Written into the final run (STUDY_DIR/best) to say which trial it was trained from.
TRAINED_FROM = "trained_from.json"


class TuneSettings(BaseModel):
    """How a tuning job runs (the training options live in the fixed ``TrainConfig``)."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field("visiontune", description="study name")
    study_dir: str | None = Field(None, description="default: studies/STUDY")
    storage: str | None = Field(None, description="default: STUDY_DIR/journal.log")
    objective: str = "valid_loss"
    direction: Literal["auto", "minimize", "maximize"] = "auto"
    max_trials: int = Field(10, ge=1)
    parallel: int = Field(1, ge=1)
    trial_nproc: int = Field(1, ge=1, description="processes per trial (torchrun above 1)")
    strategy: Literal["bayesian", "random", "grid", "hyperband"] = "bayesian"
    early_stopping: Literal["off", "auto"] = "off"
    timeout: float | None = Field(None, gt=0)
    max_retry: int = Field(2, ge=0)
    heartbeat: int = Field(10, ge=1, description="seconds between trial heartbeats")
    seed: int | None = Field(None, description="sampler seed; default the training seed")
    warm_start: list[str] = Field(default_factory=list)
    keep_checkpoints: Literal["models", "best", "all", "none"] = Field(
        "models", description="what finished trials keep on disk (see tidy_trial_dirs)"
    )
    train_best: bool = False
    report: bool = True
    baseline: bool = Field(
        True,
        description="a new study's first trial is the untuned default, kept unless a trial "
        "beats it beyond noise (see visiontune.tuning.baseline)",
    )
    cv: int | Literal["auto"] = Field(
        "auto",
        description="K-fold cross-validated objective: auto (on for a small valid split), "
        "0 (off) or K (see visiontune.tuning.cv)",
    )

    @field_validator("cv")
    @classmethod
    def _folds(cls, v: int | str) -> int | str:
        if v != "auto" and (v < 0 or v == 1):
            raise ValueError(f"must be auto, 0 (off) or a number of folds >= 2, got {v}")
        return v

    def resolved_study_dir(self) -> Path:
        """``--study-dir``, or the default directory of the study."""
        return Path(self.study_dir) if self.study_dir else default_study_dir(self.study)


@dataclass
class TuneResult:
    """What a tuning job left behind."""

    study: str
    study_dir: Path
    storage: str
    counts: dict[str, int]
    best: dict[str, Any] | None
    report: Path | None = None
    best_run: Path | None = None


def _fixed_for_storage(fixed) -> dict[str, Any]:
    """The fixed training options as stored in the study (tuner-owned keys dropped)."""
    values = fixed.model_dump(mode="json")
    for key in RESERVED:
        if key != "data":
            values.pop(key, None)
    data = values["data"]
    if "://" not in data and Path(data).exists():
        values["data"] = str(Path(data).resolve())  # workers may start in another directory
    return values


def check_objective(objective: str) -> None:
    if objective not in METRICS:
        import difflib

        close = difflib.get_close_matches(objective, METRICS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"one of {', '.join(METRICS)}"
        raise UserError(f"unknown objective {objective!r} ({hint})")


def check_batch_sizes(fixed, space: SearchSpace):
    """Fail before any trial when a batch size exceeds the training split.

    Returns:
        The dataset's index (what the check discovered), for :func:`data_key`.

    Raises:
        UserError: the largest batch size in play is larger than the training split.
    """
    from visiontune.data.folder import discover
    from visiontune.data.splits import resolve_splits

    sizes = [fixed.batch_size]
    for p in space.params:
        if p.name == "batch_size":
            sizes = [int(v) for v in p.corners()]
    limit = fixed.limit_per_class
    index = discover(
        fixed.data,
        endpoint_url=fixed.endpoint_url,
        split_ratios=fixed.split_ratios,
        split_seed=fixed.split_seed,
        limit_per_class=limit,
    )
    # The same split train() uses (valid carved out of train when there is none).
    n_train = len(resolve_splits(index, fixed.split_seed, announce=False).get("train") or [])
    too_big = [b for b in sizes if b > n_train]
    if too_big:
        raise UserError(
            f"batch size {max(too_big)} is larger than the training split of {fixed.data} "
            f"({n_train} images); lower it in the space or the fixed options"
        )
    return index


def data_key(index) -> dict[str, Any]:
    """What a continued study must find again in its data: the number of images, and a key of
    every image's split, path (under the dataset's root), label and size.

    Modification times are left out, so a copy of the same files (``cp``, ``rsync`` without
    ``-t``) is the same data.
    """
    images = sum(len(items) for items in index.splits.values())
    return {"key": index.fingerprint(portable=True), "images": images}


def create_study(settings: TuneSettings, fixed, space: SearchSpace):
    """Validate everything, then create the study (or load it to continue).

    Args:
        settings: how to tune.
        fixed: the fixed training options (a validated ``TrainConfig``).
        space: the ranges.

    Returns:
        ``(study, storage_url, study_dir)``.

    Raises:
        UserError: any bad input, before a trial runs.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_objective(settings.objective)
    given = fixed
    fixed, space, small_lines, size = _small_data(fixed, space)
    if "objective" not in settings.model_fields_set:  # none named: small data may choose
        from visiontune.smalldata import small_objective

        objective, line = small_objective(given, *size)
        if objective is not None:
            settings = settings.model_copy(update={"objective": objective})
            small_lines.append(line)
    fixed_values = _fixed_for_storage(fixed)
    space.validate(fixed_values)
    if settings.strategy == "grid":
        space.grid()
    data = data_key(check_batch_sizes(fixed, space))
    if settings.trial_nproc != 1:
        check_distributed_trials(
            {"fixed": fixed_values}, space, settings.parallel, settings.trial_nproc
        )
    cv = _plan_cv(settings, fixed)
    study_dir = settings.resolved_study_dir()
    storage_url = settings.storage or default_storage(study_dir)
    storage = open_storage(storage_url, heartbeat=settings.heartbeat, max_retry=settings.max_retry)
    warm_sources = _warm_start_sources(settings, storage_url)
    direction = direction_for(settings.objective, settings.direction)
    payload = {
        "format": FORMAT,
        "fixed": fixed_values,
        "space": space.to_dict(),
        "objective": settings.objective,
        "direction": direction,
        "strategy": settings.strategy,
        "early_stopping": settings.early_stopping,
        "max_trials": settings.max_trials,
        "keep_checkpoints": settings.keep_checkpoints,
        "seed": fixed.seed if settings.seed is None else settings.seed,
        "max_retry": settings.max_retry,
        "cv": cv.folds,  # folds per trial (0: plain validation); see visiontune.tuning.cv
        "cv_note": cv.line,
        "valid_images": cv.valid_images,  # the noise of a plain accuracy (tuning.baseline)
        "baseline": untuned_default(given, space, *size),  # trial 0, if in the space
        "data": data,  # a continued study trains on the same images (data_key)
    }
    with quiet_optuna():
        try:
            _check_new_study_owns_its_trials(storage, settings.study, study_dir)
            study = optuna.create_study(
                study_name=settings.study,
                storage=storage,
                direction=direction,
                load_if_exists=True,
            )
        except Exception as e:
            if isinstance(e, UserError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot use storage {redact(storage_url)}: {first}") from e
    existing = study.user_attrs.get(ATTR)
    if existing is None:
        study.set_user_attr(ATTR, payload)
    else:
        for key in ("fixed", "space", "objective", "direction", "strategy", "early_stopping", "cv"):
            # A study from before cross-validation has no "cv": it validated plainly.
            before = existing.get(key, 0 if key == "cv" else None)
            if before != payload[key]:
                raise UserError(
                    f"study {settings.study!r} already exists with a different {key}"
                    f"{_what_differs(before, payload[key])}; continue it with the same "
                    "options, or start a new one with --study NAME"
                )
        _check_same_data(settings.study, fixed.data, existing.get("data"), data)
        # The budget, what trials keep and the retries of a dead worker's trial may change when
        # a study is continued.
        changed = {k: payload[k] for k in ("max_trials", "keep_checkpoints", "max_retry")}
        if any(existing.get(k) != v for k, v in changed.items()):
            study.set_user_attr(ATTR, {**existing, **changed})
    _warm_start(study, warm_sources, space)  # a continued study too: --warm-start is not lost
    for line in (*small_lines, cv.line):  # every check passed: the study starts with these
        print(line, file=sys.stderr)
    return study, storage_url, study_dir


def _what_differs(before: Any, now: Any) -> str:
    """Which options of a stored mapping (the fixed options, the space) differ, and how: the
    user otherwise had to find one changed option among dozens."""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return f" ({before!r} then, {now!r} now)"
    keys = [k for k in sorted({*before, *now}) if before.get(k) != now.get(k)]
    shown = ", ".join(f"{k} ({before.get(k)!r} then, {now.get(k)!r} now)" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f": {shown}{more}"


def _check_same_data(study: str, where: str, before: dict | None, now: dict) -> None:
    """A continued study must train on the images its trials trained on: with images added,
    removed or relabelled at the same path, new trials were ranked against old ones measured
    on other validation images (and the untuned default's noise on other images), silently.

    Raises:
        UserError: the data changed since the study started (a study from before this check
            stored no key, and is let through).
    """
    if before is None or before.get("key") == now["key"]:
        return
    raise UserError(
        f"the data at {where} changed since study {study!r} started ({before.get('images')} "
        f"images then, {now['images']} now): its trials would be compared on different images; "
        "continue it with the data as it was, or start a new one with --study NAME"
    )


def _check_new_study_owns_its_trials(storage, name: str, study_dir: Path) -> None:
    """A study that its storage does not hold yet must not start where trial runs already
    are: its trial 0 (the untuned default) would find another study's run in ``trials/0000``,
    fail, and leave the study without its baseline.

    Raises:
        UserError: ``study_dir/trials`` holds runs and the study is new.
    """
    try:
        storage.get_study_id_from_name(name)
        return  # continued: the runs are its own
    except KeyError:
        pass
    trials = study_dir / "trials"
    held = sorted(p.name for p in trials.iterdir()) if trials.is_dir() else []
    if held:
        raise UserError(
            f"{trials} holds {len(held)} trial runs ({held[0]}...) that no study named "
            f"{name!r} in this storage owns (another study's, or its storage was removed): "
            "choose another --study-dir, or move them away"
        )


def _small_data(fixed, space: SearchSpace):
    """The study's fixed options and space on a small data set (``visiontune.smalldata``), the
    lines that say what changed (none: unchanged), and ``(training images, classes)``."""
    from visiontune import smalldata

    n_train, classes = smalldata.training_size(fixed)
    fixed, line = smalldata.apply(fixed, n_train, classes, tuned=space.names)
    space, space_line = smalldata.small_space(space, fixed, n_train, classes)
    return fixed, space, [said for said in (line, space_line) if said], (n_train, classes)


def _stored_options(study):
    """The fixed options (a ``TrainConfig``) and the space a study stored."""
    from visiontune.config import TrainConfig, build_config
    from visiontune.tuning.space import parse_space

    stored = study.user_attrs[ATTR]
    return build_config(TrainConfig, None, stored["fixed"]), parse_space(stored["space"])


def _plan_cv(settings: TuneSettings, fixed):
    """Whether trials cross-validate, and the line that says why (how noisy the plain
    objective is)."""
    from visiontune.tuning.cv import plan_cv

    if fixed.cv_folds is not None or fixed.refit:
        raise UserError(
            "cv_folds, cv_fold and refit are set by the tuner: use --cv K to cross-validate "
            "a study (--train-best then refits)"
        )
    requested = settings.cv
    if settings.trial_nproc != 1 and requested == "auto":
        requested = 0  # distributed trials validate plainly unless --cv asks otherwise
    plan = plan_cv(requested, fixed)
    if plan.folds and settings.trial_nproc != 1:
        raise UserError(
            f"--trial-nproc {settings.trial_nproc} with cross-validation: a fold trains on "
            "cached features in one process; use --parallel for more trials at once, or --cv 0"
        )
    prunes = settings.strategy == "hyperband" or settings.early_stopping == "auto"
    if plan.folds and prunes:
        plan = replace(plan, line=f"{plan.line}; pruning is off under CV (a trial's folds all run)")
    return plan


def _warm_start_sources(settings: TuneSettings, storage_url: str) -> list[tuple[str, Any]]:
    """The earlier studies ``--warm-start`` names, as ``(name, storage)``: found before the
    study is created, so a mistyped source leaves nothing behind.

    Raises:
        UserError: a source that is neither a study in the storage nor a study directory.
    """
    import optuna

    sources = []
    for source in settings.warm_start:
        path = Path(source)
        if path.is_dir() and (path / "journal.log").is_file():
            storage = open_storage(str(path / "journal.log"))
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            name = path.name if path.name in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise UserError(f"--warm-start {source}: cannot tell which study to use ({names})")
        else:
            storage, name = open_storage(storage_url), source
            if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
                raise UserError(f"--warm-start {source}: no such study or study directory")
        same_storage = path.is_dir() and default_storage(path) == storage_url
        if name == settings.study and (same_storage or not path.is_dir()):
            raise UserError(f"--warm-start {source}: that is this study itself")
        sources.append((name, storage))
    return sources


def _warm_start(study, sources: list[tuple[str, Any]], space: SearchSpace) -> None:
    """Seed the sampler with the finished trials of earlier studies (``sources``, from
    :func:`_warm_start_sources`).

    A continued study is seeded too, with the trials it does not hold yet: the seeds are
    tagged with their origin, so naming the same source again adds nothing twice.
    """
    import optuna

    if not sources:
        return
    dists = space.distributions()
    held = {t.user_attrs[WARM_START] for t in study.get_trials(deepcopy=False)
            if WARM_START in t.user_attrs}  # fmt: skip
    added = 0
    for name, storage in sources:
        other = optuna.load_study(study_name=name, storage=storage)
        for t in other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if set(t.params) != set(dists) or WARM_START in t.user_attrs:
                continue
            if not all(
                dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in t.params.items()
            ):
                continue
            tag = f"{name}#{t.number}"
            if tag in held:
                continue
            study.add_trial(
                optuna.trial.create_trial(
                    params=dict(t.params),
                    distributions=dists,
                    value=t.value,
                    user_attrs={WARM_START: tag},
                )
            )
            held.add(tag)
            added += 1
    print(f"warm start: seeded the sampler with {added} earlier trial(s)", file=sys.stderr)


def _baseline_first(study, strategy: str) -> None:
    """A new study's first trial is the untuned default (``tuning.baseline``); say so."""
    said = enqueue_baseline(study, study.user_attrs[ATTR].get("baseline"), strategy)
    if said.get("params") is not None:
        print(
            f"trial 0 is the untuned default ({fmt_params(said['params'])}): the study keeps it "
            "unless a trial beats it by more than the objective's noise",
            file=sys.stderr,
        )
    elif said.get("why"):
        print(
            f"no baseline trial: {said['why']}, so no trial is the untuned default",
            file=sys.stderr,
        )


def tune(settings: TuneSettings, fixed, space: SearchSpace) -> TuneResult:
    """Run (or continue) a tuning job: validate, create the study, run trials, write the report.

    Args:
        settings: how to tune.
        fixed: the fixed training options (a validated ``TrainConfig``).
        space: the ranges.

    Returns:
        The :class:`TuneResult`.

    Raises:
        UserError: bad input (before any trial), or every worker failed.
    """
    study, storage_url, study_dir = create_study(settings, fixed, space)
    fixed, space = _stored_options(study)  # with what small data changed (create_study)
    if settings.baseline:
        _baseline_first(study, settings.strategy)
    study_dir.mkdir(parents=True, exist_ok=True)
    # Trials train on cached features (augmented views too, when the space draws their number).
    fast = fixed.uses_feature_cache or (
        fixed.frozen_backbone and fixed.feature_cache and "augment_views" in space.names
    )
    size = space.size()
    if size is not None and size < settings.max_trials:
        # A configuration never runs twice, so a small finite space caps the study.
        print(
            f"the space has {size} points: the study stops after {size} trials "
            f"(--max-trials {settings.max_trials})",
            file=sys.stderr,
        )
    start = time.monotonic()
    if settings.parallel == 1:
        run_local_worker(settings, storage_url, study_dir, timeout=settings.timeout)
    else:
        if fast and not counted_trials(study):
            # One trial here first computes the backbone features once; the workers then all
            # read them from the cache instead of computing them side by side.
            run_local_worker(settings, storage_url, study_dir, max_new_trials=1)
        left = (
            None
            if settings.timeout is None
            else max(1.0, settings.timeout - (time.monotonic() - start))
        )
        procs = spawn_workers(
            settings.parallel,
            settings.study,
            storage_url,
            study_dir,
            heartbeat=settings.heartbeat,
            timeout=left,
            trial_nproc=settings.trial_nproc,
            gpus=_worker_gpus(fixed, settings.trial_nproc),
        )
        wait_workers(procs)
    study, result = study_result(settings, storage_url, study_dir)
    if result.best and result.best["selection"]:  # how the untuned default was weighed
        print(result.best["selection"], file=sys.stderr)
    if fixed.tracking is not None:  # the study's parent run in MLflow: states, best, report
        from visiontune.tracking.tuning import log_study

        log_study(study, study_dir, result.report)
    if settings.train_best:
        result.best_run = train_best(study, study_dir / "best")
    return result


def _worker_gpus(fixed, trial_nproc: int) -> list[str] | None:
    """The GPUs ``--parallel`` workers share out, one each (``None``: trials on the CPU, a
    GPU the fixed options name, or trials of several processes, which take theirs by worker
    index)."""
    if trial_nproc != 1 or str(fixed.device) not in ("auto", "cuda"):
        return None
    from visiontune.tuning.distributed import uses_cuda, visible_gpus

    return visible_gpus() if uses_cuda(str(fixed.device)) else None


def run_local_worker(settings: TuneSettings, storage_url: str, study_dir: Path, **limit) -> int:
    """Run trials of the study in this process, as worker 0 (the index that seeds the first
    sampler), with the settings' heartbeat and processes per trial.

    Args:
        settings: the study's name, heartbeat and ``trial_nproc``.
        storage_url: the study's storage.
        study_dir: where the trial runs go.
        limit: ``timeout`` or ``max_new_trials`` of :func:`~visiontune.tuning.workers.run_worker`.

    Returns:
        The number of trials it ran.
    """
    return run_worker(
        settings.study,
        storage_url,
        study_dir,
        heartbeat=settings.heartbeat,
        worker=0,
        trial_nproc=settings.trial_nproc,
        **limit,
    )


def study_result(
    settings: TuneSettings, storage_url: str, study_dir: Path
) -> tuple[Any, TuneResult]:
    """The study as the workers left it: counts, best trial, and its HTML report."""
    study = load_study(settings.study, storage_url, heartbeat=settings.heartbeat)
    result = TuneResult(
        study=settings.study,
        study_dir=study_dir,
        storage=storage_url,
        counts=trial_counts(study),
        best=best_summary(study),
    )
    if settings.report:
        from visiontune.tuning.report import write_report

        result.report = write_report(study, study_dir / "report.html")
    return study, result


def retrain_best(study, output: Path, done: str, run: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run ``run(best_trial)`` into ``output`` unless it already holds a run of the best trial.

    The bookkeeping both kinds of study share (built-in training and users' scripts):
    ``output/trained_from.json`` names the trial a final run came from; the previous final
    run is moved aside while the new one runs and put back if it fails (or if a retraining
    was killed half-way).

    Args:
        study: the Optuna study.
        output: the final run's directory.
        done: the file in ``output`` that marks a completed final run (``model`` or
            ``job.json``).
        run: trains the trial's configuration into ``output``.

    Returns:
        ``(trial, run's result)``, or ``(trial, None)`` when ``output`` is already current.

    Raises:
        UserError: the study has no complete trial yet.
    """
    import json
    import shutil

    from visiontune.io import atomic_write_json

    t = best_trial(study)
    if t is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to train from")
    source = {"study": study.study_name, "trial": t.number, "params": dict(t.params)}
    marker = output / TRAINED_FROM
    if marker.is_file() and (output / done).exists():
        try:
            before = json.loads(marker.read_text())
        except (OSError, ValueError):
            before = None
        if before == source:
            print(f"{output} is already trained from trial {t.number}, the best", file=sys.stderr)
            return t, None
    previous = output.with_name(f".{output.name}.previous")
    if previous.exists():  # a retraining was killed: its partial run goes, the previous returns
        shutil.rmtree(output, ignore_errors=True)
        previous.rename(output)
    if output.exists():
        output.rename(previous)
    try:
        result = run(t)
    except BaseException:
        if previous.exists():  # a failed retraining must not lose the previous final run
            failed = output.with_name(f"{output.name}.failed")
            shutil.rmtree(failed, ignore_errors=True)
            if output.exists():
                output.rename(failed)
            previous.rename(output)
        raise
    atomic_write_json(marker, source)
    if previous.exists():
        shutil.rmtree(previous, ignore_errors=True)
        print(f"retrained {output} from trial {t.number}, the new best", file=sys.stderr)
    return t, result


def train_best(study, output: Path) -> Path:
    """Train the final model with the fixed options and the best trial's parameters.

    Run again after more trials, it trains the new best into ``output`` in place of the model
    trained from an earlier best; when ``output`` already holds the current best, it says so and
    trains nothing. The previous final run is moved aside while the new one trains and put back
    if training fails.

    Raises:
        UserError: the study has no complete trial yet.
    """
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train

    cfg = study_config(study)
    # A cross-validated study chose the hyperparameters (epochs included) on folds of
    # train+valid: the final model trains on all of it (refit) and is judged on test.
    refit = {"refit": True} if cfg.get("cv") else {}

    def run(t) -> Any:
        values = {**cfg["fixed"], **t.params, **refit, "output": str(output)}
        return train(build_config(TrainConfig, None, values))

    retrain_best(study, output, "model", run)
    return output
